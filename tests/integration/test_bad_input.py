"""The catalogue of bad input and damaged files, across every command.

Each case runs one `lmtrain` command line against a shared workspace (a prepared data dir, a
trained run, crafted and damaged checkpoints, bad sources) and asserts the promise of the
README: exit 0 with correct work, or exit 2 with one line on stderr that names the key or
the file; nothing in the workspace changes; no crafted pickle runs; and no case hangs (each
is bounded by a timeout). Most cases run in this process (`lmtrain.cli.main`), the few that
train run as processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

from tests.helpers import DEBUG, TINY_DATA, TINY_MODEL, run_cli

# The model and steps of the workspace's run.
RUN = [*TINY_MODEL, "trainer.max_steps=4", "checkpoint.every_n_steps=2", "trainer.val_every_n_steps=2",
       "trainer.progress_bar=false"]


class Evil:
    """Unpickling this runs a command: what a crafted checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@dataclass
class Workspace:
    root: Path
    data: Path  # a prepared tiny data dir
    run: Path  # a trained run (steps 2 and 4 saved)
    marker: Path  # created if a crafted pickle ever runs
    read_only: Optional[Path]  # a read-only filesystem, where one can be mounted

    def cases(self, name: str) -> Path:
        d = self.root / "cases" / name
        d.mkdir(parents=True, exist_ok=True)
        return d


def _mount_read_only(path: Path) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_data):
    from lmtrain.config import load_config
    from lmtrain.train.run import train

    root = tmp_path_factory.mktemp("catalogue")
    data = Path(next(a for a in tiny_data if a.startswith("data.dir=")).split("=", 1)[1])
    shutil.copytree(data, root / "data")
    train(load_config(DEBUG, [*TINY_DATA, f"data.dir={root / 'data'}", *RUN, f"run.root={root / 'runs'}",
                              "run.name=plain"]), log=lambda s: None)
    marker = root / "PWNED"
    torch.save({"state_dict": Evil(marker), "global_step": 1}, root / "evil.ckpt")  # a torch zip, crafted
    with open(root / "evil_raw.ckpt", "wb") as f:  # a bare pickle, crafted
        import pickle

        pickle.dump(Evil(marker), f)
    (root / "random.ckpt").write_bytes(random.Random(0).randbytes(20000))
    last = root / "runs" / "plain" / "checkpoints" / "last.ckpt"
    (root / "trunc.ckpt").write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    (root / "a_file").write_text("not a directory\n")
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("someone's files\n")
    sources(root / "src")
    ro = root / "ro"
    w = Workspace(root, root / "data", root / "runs" / "plain", marker, ro if _mount_read_only(ro) else None)
    for case in CASES:
        if case.setup is not None:
            case.setup(w)
    yield w
    if w.read_only is not None:
        subprocess.run(["umount", str(w.read_only)], capture_output=True)


def sources(src: Path) -> None:
    """Text sources, bad and good, for prepare-data."""
    for name in ("empty", "binary", "binkind", "latin", "jint", "jbad", "jfield", "parquet", "long", "nofiles",
                 "gzcut"):
        (src / name).mkdir(parents=True)
    rng = random.Random(1)
    for i in range(3):
        (src / "empty" / f"e{i}.txt").write_text("")
        (src / "binary" / f"b{i}.txt").write_bytes(rng.randbytes(3000))  # named as text: refused
        (src / "binkind" / f"b{i}.bin").write_bytes(rng.randbytes(3000))  # another kind: left out
        (src / "latin" / f"l{i}.txt").write_bytes(("café naïve résumé déjà vu\n" * 40).encode("latin-1"))
    rows = [json.dumps({"text": f"document {i} " * 20}) for i in range(6)]
    (src / "jint" / "d.jsonl").write_text("\n".join([*rows, json.dumps({"text": 12})]) + "\n")
    (src / "jbad" / "d.jsonl").write_text("\n".join([*rows, "{not json"]) + "\n")
    (src / "jfield" / "d.jsonl").write_text("\n".join([*rows, json.dumps({"body": "x"})]) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": list(range(10))}), src / "parquet" / "d.parquet")
    import gzip

    import datasets

    (src / "gzcut" / "a.txt.gz").write_bytes(gzip.compress(b"some text\n" * 500)[:40])  # truncated
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a", "b"]})}).save_to_disk(
        str(src / "saved"))
    # One line of 2 MB without a space (a minified blob), and a few ordinary documents.
    (src / "long" / "blob.txt").write_text("".join(rng.choice("abcdefghij") for _ in range(2_000_000)))
    for i in range(3):
        (src / "long" / f"doc{i}.txt").write_text("def f(x):\n    return x + 1\n" * 50)


# -- setups: damaged copies of the data dir and the run ------------------------------------------------


def damaged_data(how: str) -> Callable[[Workspace], None]:
    def setup(w: Workspace) -> None:
        d = w.cases(f"data-{how}") / "data"
        shutil.copytree(w.data, d)
        if how == "truncated":
            with open(d / "train.bin", "r+b") as f:
                f.truncate(1000)
        elif how == "overwritten":
            with open(d / "train.bin", "r+b") as f:
                f.seek((d / "train.bin").stat().st_size // 2)
                f.write(random.Random(2).randbytes(4096))
        elif how == "meta":
            (d / "meta.json").write_text('{"splits": ')
        elif how == "no-tokenizer":
            (d / "tokenizer.json").unlink()
        elif how == "tokenizer":
            (d / "tokenizer.json").write_text((d / "tokenizer.json").read_text().replace("endoftext", "endoftexx"))
        elif how == "index":
            (d / "val.idx.npy").write_bytes(b"junk")
    return setup


def damaged_run(how: str, name: str) -> Callable[[Workspace], None]:
    """A copy of the run (in cases/NAME/runs/r) whose last.ckpt is truncated (`truncated`), or
    whose checkpoints are all crafted (`crafted`) or all damaged (`all`)."""
    def setup(w: Workspace) -> None:
        run = w.cases(name) / "runs" / "r"
        shutil.copytree(w.run, run)
        for p in (run / "checkpoints").glob("*.ckpt"):
            if how == "crafted":
                shutil.copy(w.root / "evil.ckpt", p)
            elif how == "all" or p.name == "last.ckpt":
                p.write_bytes(p.read_bytes()[:5000] if p.name == "last.ckpt" else b"\0" * 100)
    return setup


def other_model_run(w: Workspace) -> None:
    from lmtrain.config import load_config
    from lmtrain.train.run import train

    train(load_config(DEBUG, [*TINY_DATA, f"data.dir={w.data}", *RUN, "model.n_layers=1", "trainer.max_steps=2",
                              f"run.root={w.cases('other-model')}", "run.name=r"]), log=lambda s: None)


def short_train_split(w: Workspace) -> None:
    """A source whose documents fall into the validation split but for a few tiny ones."""
    src = w.cases("short") / "src"
    src.mkdir()
    words = ["alpha", "beta", "gamma", "delta", "x", "y", "def", "return"]
    rng = random.Random(1)
    for i in range(40):
        (src / f"d{i:02d}.py").write_text(" ".join(rng.choice(words) for _ in range(3 if i % 2 else 400)))


def foreign_partial(w: Workspace) -> None:
    p = w.cases("partial") / "exp.partial"
    p.mkdir()
    (p / "mine.txt").write_text("not lmtrain's\n")


# -- the cases ----------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    argv: Callable[[Workspace], list[str]]
    expect: str = ""  # in the one error line (exit 2), or in the output (exit 0)
    code: int = 2
    setup: Optional[Callable[[Workspace], None]] = None
    process: bool = False  # run as a process (it trains)
    timeout: int = 120
    check: Optional[Callable[[Workspace, str, str], None]] = None  # exit 0: the work was right
    writes: bool = False  # may write new files (its outputs)
    owns: str = ""  # a directory (under the workspace) whose existing files the case may change: its run
    needs: Optional[str] = None  # "read_only": skipped where no read-only filesystem can be mounted
    progress: bool = False  # it works (prepares data, trains) and reports progress before it fails


def cfg(*overrides: str) -> Callable[[Workspace], list[str]]:
    """`lmtrain config DEBUG` with the workspace's data and run root and these overrides (`{w.data}`
    and such are filled in)."""
    return lambda w: ["config", DEBUG, *TINY_DATA, f"data.dir={w.data}", f"run.root={w.root / 'runs'}",
                      *(o.format(w=w) for o in overrides)]


def train(*overrides: str, data: Optional[str] = None) -> Callable[[Workspace], list[str]]:
    def argv(w: Workspace) -> list[str]:
        d = data.format(w=w) if data else str(w.data)
        return ["train", DEBUG, *TINY_DATA, f"data.dir={d}", *RUN, f"run.root={w.root / 'runs'}",
                *(o.format(w=w) for o in overrides)]
    return argv


def prep(source: str, *extra: str) -> Callable[[Workspace], list[str]]:
    out = f"prep-{source.split('/')[0]}" + ("-" + extra[0].split("=")[1] if extra else "")
    return lambda w: ["prepare-data", DEBUG, f"data.source={w.root / 'src' / source}", "data.vocab_size=300",
                      "data.max_documents=null", f"data.dir={w.root / 'cases' / out / 'data'}", *extra]


def cmd(*args: str) -> Callable[[Workspace], list[str]]:
    return lambda w: [a.format(w=w) for a in args]


def preset(name: str) -> Callable[[Workspace], list[str]]:
    return lambda w: ["config", str(w.root / "cases" / "presets" / name)]


def write_presets(w: Workspace) -> None:
    d = w.cases("presets")
    (d / "list.yaml").write_text("model:\n  - 1\n  - 2\n")
    (d / "syntax.yaml").write_text("model: {n_layers: 2\n")
    (d / "toplist.yaml").write_text("- a\n- b\n")
    (d / "cycle_a.yaml").write_text("base: cycle_b.yaml\n")
    (d / "cycle_b.yaml").write_text("base: cycle_a.yaml\n")
    (d / "legacy.yaml").write_text("model:\n  position: rope\n  rope_theta: 500000\n")


def resumed_from_the_step_file(w: Workspace, out: str, err: str) -> None:
    assert "last.ckpt is unusable" in out and "resuming from step000004.ckpt (step 4)" in out, out[-2000:]
    from lmtrain.train.checkpoint import checkpoint_step

    assert checkpoint_step(w.root / "cases" / "fallback" / "runs" / "r" / "checkpoints" / "last.ckpt") == 6


def note_and_text(w: Workspace, out: str, err: str) -> None:
    assert "last.ckpt is unusable" in err and "using step000004.ckpt (step 4)" in err, err
    assert out.startswith("def "), out


def prepared(name: str) -> Callable[[Workspace, str, str], None]:
    def check(w: Workspace, out: str, err: str) -> None:
        meta = json.loads((w.root / "cases" / name / "data" / "meta.json").read_text())
        assert meta["splits"]["train"]["tokens"] > 0
    return check


def partial_untouched(w: Workspace, out: str, err: str) -> None:
    p = w.root / "cases" / "partial"
    assert (p / "exp.partial" / "mine.txt").read_text() == "not lmtrain's\n"
    assert (p / "exp" / "model.safetensors").is_file()


NAN = ["optim.lr=1e6", "optim.min_lr=0", "trainer.max_steps=30", "checkpoint.every_n_steps=1", "run.name=nan",
       "trainer.log_every_n_steps=1", "trainer.max_bad_steps=3"]


def stopped_with_finite_weights(w: Workspace, out: str, err: str) -> None:
    """Steps 1 and 2 were good, 3 to 5 skipped: resume finds step 2's weights, all finite."""
    from lmtrain.train.checkpoint import load_trained

    t = load_trained(w.root / "runs" / "nan")
    assert t.step == 2 and all(torch.isfinite(p).all() for p in t.model.parameters())
    assert "step 3: non-finite loss or gradient norm; step skipped (1 in a row, stop at 3)" in out
    assert not (w.root / "runs" / "nan" / "summary.json").exists()


CASES = [
    # -- configs, presets and overrides (any command that takes a config) --
    Case("unknown-key", cfg("model.n_layer=3"), "model.n_layer: unknown key (did you mean model.n_layers?)"),
    Case("wrong-type", cfg("model.n_layers=abc"), "model.n_layers: wrong type"),
    Case("length-schedule-syntax", cfg("data.seq_len=32,64"), "data.seq_len: '64' needs the optimizer step it "
                                                              "starts at: 64@STEP"),
    Case("rope-interpolate", cfg("model.position=rope", "model.position.interpolate=0.5"),
         "model.position.interpolate=0.5: must be at least 1"),
    Case("length-schedule-order", cfg("data.seq_len=32,64@5,128@5"), "data.seq_len: steps must increase"),
    Case("length-schedule-tokens", cfg("data.seq_len=48,64@5"), "data.seq_len: 48 does not divide the longest "
                                                                "length 64"),
    Case("sequence-parallel-strategy", cfg("trainer.sequence_parallel=2", "trainer.devices=2"),
         "trainer.sequence_parallel=2: splits sequences across processes; set trainer.strategy=ddp or deepspeed"),
    Case("sequence-parallel-kind", cfg("trainer.sequence_parallel=2", "trainer.devices=2", "trainer.strategy=ddp",
                                       "model.attention.kind=lsh", "model.position.kind=none"),
         "trainer.sequence_parallel=2: model.attention.kind=lsh cannot attend over a split sequence"),
    Case("synonym-hidden-size", cfg("model.hidden_size=512"), "model.hidden_size: unknown key (lmtrain calls it "
                                                              "model.d_model)"),
    Case("synonym-learning-rate", cfg("learning_rate=3e-4"), "learning_rate: unknown key (lmtrain calls it optim.lr)"),
    Case("synonym-val-check-interval", cfg("trainer.val_check_interval=100"),
         "(lmtrain calls it trainer.val_every_n_steps)"),
    Case("devices-word", cfg("trainer.devices=many"), "trainer.devices: 'many' must be a positive count, -1"),
    Case("bad-value", cfg("data.val_fraction=2"), "data.val_fraction"),
    Case("decay-before-warmup", cfg("optim.warmup_steps=50", "optim.decay_steps=40"),
         "optim.decay_steps: 40 must exceed optim.warmup_steps=50"),
    Case("unknown-kind", cfg("model.attention.kind=nope"), "model.attention.kind: unknown kind 'nope'"),
    Case("list-for-mapping", cfg("model=[1,2]"), "model: expected a mapping"),
    Case("sparse-unknown-pattern", cfg("model.attention.kind=sparse", "model.attention.pattern=windw"),
         "model.attention.pattern: unknown pattern 'windw'"),
    Case("sparse-head-groups", cfg("model.attention.kind=sparse", "model.attention.pattern=window|strided|fixed"),
         "do not divide model.n_heads"),
    Case("sparse-layer-patterns-type", cfg("model.attention.kind=sparse", "model.attention.layer_patterns=7"),
         "model.attention.layer_patterns"),
    Case("distance-aware-with-alibi", cfg("model.attention.kind=distance_aware"),
         "model.attention.kind=distance_aware cannot apply the additive score bias of model.position.kind=alibi "
         "(the DA-Transformer multiplies the scores"),
    Case("rel-buckets-max-distance", cfg("model.position=rel_buckets", "model.position.max_distance=10"),
         "model.position.max_distance: must exceed buckets/2 = 16"),
    Case("gaussian-width", cfg("model.position=gaussian", "model.position.min_width=0"),
         "model.position.min_width: must be positive"),
    Case("kerple-eps", cfg("model.position=kerple_log", "model.position.eps=0"),
         "model.position.eps: must be positive"),
    Case("rel-buckets-table-std", cfg("model.position=rel_buckets", "model.position.table_std=-1"),
         "model.position.table_std: must be 0 or positive"),
    Case("distance-aware-block", cfg("model.attention.kind=distance_aware", "model.position=none",
                                     "model.attention.block=-1"),
         "model.attention.block must be 0 (from mask_budget_mb) or positive"),
    Case("lsh-with-rope", cfg("model.attention.kind=lsh", "model.position=rope"),
         "model.attention.kind=lsh with model.position.kind=rope: it rotates queries and keys"),
    Case("lsh-with-alibi", cfg("model.attention.kind=lsh"),
         "model.attention.kind=lsh cannot apply the additive score bias of model.position.kind=alibi"),
    Case("lsh-odd-buckets", cfg("model.attention.kind=lsh", "model.position=none", "model.attention.buckets=5"),
         "model.attention.buckets=5: use 1, an even count"),
    Case("lsh-rounds", cfg("model.attention.kind=lsh", "model.position=none", "model.attention.rounds=0"),
         "model.attention.rounds must be at least 1"),
    Case("lowrank-slots", cfg("model.attention.kind=lowrank_causal", "model.position=none",
                              "model.attention.segment=8", "model.attention.slots=9"),
         "model.attention.slots=9: use 0 (own segment only) to model.attention.segment=8"),
    Case("lowrank-compress", cfg("model.attention.kind=lowrank_causal", "model.position=none",
                                 "model.attention.compress=pca"),
         "model.attention.compress='pca': choose one of static, dynamic"),
    Case("lowrank-documents", cfg("model.attention.kind=lowrank_causal", "model.position=none",
                                  "data.document_mask=true"),
         "data.document_mask=true: model.attention.kind=lowrank_causal cannot stop attention"),
    Case("ffn-chunk-negative", cfg("model.ffn_chunk=-4"), "model.ffn_chunk: must be 0"),
    Case("exp-decay-option-on-alibi", cfg("model.position.learn=false"), "model.position.learn: unknown key"),
    Case("document-mask-kind", cfg("model.attention.kind=performer", "model.position=rope", "data.document_mask=true"),
         "data.document_mask=true: model.attention.kind=performer cannot stop attention at document boundaries"),
    Case("document-mask-type", cfg("data.document_mask=maybe"), "data.document_mask"),
    Case("copy-odd-length", cfg("data.source=copy", "data.seq_len=63"), "data.seq_len=63: the copy task needs an even"),
    Case("copy-few-symbols", cfg("data.source=copy", "data.seq_len=64", "data.copy.symbols=10"),
         "data.copy.symbols: 10 symbols cannot fill a half of 31"),
    Case("copy-unknown-key", cfg("data.source=copy", "data.copy.lenght=3"), "data.copy.lenght"),
    Case("tokenizer-missing", cfg("data.tokenizer=missing/tokenizer.json"),
         "data.tokenizer: missing/tokenizer.json does not exist"),
    Case("tokenizer-not-a-tokenizer", cfg("data.tokenizer={w.root}/evil_raw.ckpt"),
         "is not a tokenizers tokenizer.json"),
    Case("tokenizer-eos-unknown", cfg("data.tokenizer={w.data}/tokenizer.json", "data.eos_token=</s>"),
         "data.eos_token: '</s>' is not a token of"),
    Case("tokenizer-vocab-small", cfg("data.tokenizer={w.data}/tokenizer.json", "data.vocab_size=300"),
         "data.vocab_size: 300 is smaller than the 512 ids"),
    Case("scalar-for-mapping", cfg("data=5"), "data: expected a mapping"),
    Case("legacy-key", cfg("model.rope_theta=5"), "model.rope_theta: this key moved; write model.position.theta"),
    Case("negative-seed", cfg("run.seed=-1"), "run.seed"),
    Case("name-dotdot", cfg("run.name=.."), "run.name"),
    Case("name-dot", cfg("run.name=."), "run.name"),
    Case("name-300", cfg("run.name=" + "a" * 300), "run.name: 300 characters"),
    Case("name-slash", cfg("run.name=a/b"), "run.name"),
    Case("huge-vocab", cfg("data.vocab_size=2147483648"), "data.vocab_size"),
    Case("unknown-encoding", cfg("data.encoding=klingon"), "data.encoding"),
    Case("bad-steps-zero", cfg("trainer.max_bad_steps=0"), "trainer.max_bad_steps"),
    Case("no-equals", cfg("foo"), "foo: an override must look like key=value"),
    Case("unparsable", cfg("run.name=..."), "run.name=...: cannot parse this override"),
    Case("deepspeed-off", cfg("deepspeed.zero_stage=3"), "deepspeed.zero_stage"),
    Case("unknown-option", cfg("--bogus"), "unrecognized arguments: --bogus"),
    Case("unsupported-combination", cfg("model.attention.kind=performer"), "model.attention.kind=performer cannot"),
    Case("preset-missing", cmd("config", "{w.root}/nope.yaml"), "nope.yaml does not exist"),
    Case("preset-list", preset("list.yaml"), "model: expected a mapping", setup=write_presets),
    Case("preset-syntax", preset("syntax.yaml"), "syntax.yaml: cannot parse YAML"),
    Case("preset-not-mapping", preset("toplist.yaml"), "a preset must be a mapping"),
    Case("preset-cycle", preset("cycle_a.yaml"), "in a cycle"),
    Case("preset-legacy", preset("legacy.yaml"), "model.rope_theta: this key moved"),
    # -- train: the machine, the run dir, the checkpoints --
    Case("no-gpu", train("trainer.accelerator=gpu", "run.name=g"), "trainer.accelerator=gpu: no CUDA device"),
    Case("fp16-on-cpu", train("trainer.precision=16-mixed", "trainer.accelerator=auto", "run.name=h"),
         "trainer.precision=16-mixed needs a GPU"),
    Case("root-is-a-file", train("run.root={w.root}/a_file", "run.name=x"), "is a file, not a directory"),
    Case("root-read-only", train("run.root={w.root}/ro/runs", "run.name=x"), "read-only", needs="read_only"),
    Case("data-dir-is-a-run", train("run.name=x", data="{w.run}"), "data.dir: "),
    Case("run-inside-data", train("run.root={w.data}", "run.name=x"), "inside data.dir"),
    Case("resume-missing", train("run.name=x", "--resume", "{w.root}/none.ckpt"), "--resume: no checkpoint at"),
    Case("resume-crafted", train("run.name=x", "--resume", "{w.root}/evil.ckpt"), "evil.ckpt: refused"),
    Case("resume-crafted-raw", train("run.name=x", "--resume", "{w.root}/evil_raw.ckpt"), "evil_raw.ckpt: damaged"),
    Case("resume-random", train("run.name=x", "--resume", "{w.root}/random.ckpt"), "random.ckpt: damaged"),
    Case("resume-truncated", train("run.name=x", "--resume", "{w.root}/trunc.ckpt"), "trunc.ckpt: damaged"),
    Case("resume-and-no-resume", train("run.name=x", "--resume", "{w.root}/trunc.ckpt", "--no-resume"),
         "--resume and --no-resume exclude each other"),
    Case("init-crafted", train("run.name=x", "run.init_from={w.root}/evil.ckpt"), "run.init_from: "),
    Case("init-missing", train("run.name=x", "run.init_from={w.root}/none"), "run.init_from: "),
    Case("init-other-model", train("run.name=x", "run.init_from={w.root}/cases/other-model/r"),
         "run.init_from: ", setup=other_model_run),
    Case("run-dir-crafted", train("run.root={w.root}/cases/run-crafted/runs", "run.name=r"),
         "last.ckpt is unusable (refused", setup=damaged_run("crafted", "run-crafted")),
    Case("run-dir-all-damaged", train("run.root={w.root}/cases/run-all/runs", "run.name=r"),
         "no intact checkpoint", setup=damaged_run("all", "run-all")),
    Case("resume-other-model", train("run.name=plain", "model.n_layers=3"), "model.n_layers: the checkpoint"),
    Case("data-truncated", train("run.name=x", data="{w.root}/cases/data-truncated/data"), "train.bin",
         setup=damaged_data("truncated")),
    Case("data-overwritten", train("run.name=x", data="{w.root}/cases/data-overwritten/data"), "train.bin",
         setup=damaged_data("overwritten")),
    Case("data-meta", train("run.name=x", data="{w.root}/cases/data-meta/data"), "meta.json: damaged",
         setup=damaged_data("meta")),
    Case("data-no-tokenizer", train("run.name=x", data="{w.root}/cases/data-no-tokenizer/data"),
         "tokenizer.json: missing", setup=damaged_data("no-tokenizer")),
    Case("data-tokenizer-changed", train("run.name=x", data="{w.root}/cases/data-tokenizer/data"), "tokenizer.json",
         setup=damaged_data("tokenizer")),
    Case("data-index", train("run.name=x", data="{w.root}/cases/data-index/data"), "val.idx.npy",
         setup=damaged_data("index")),
    Case("short-train-split", cmd("train", DEBUG, "data.source={w.root}/cases/short/src", "data.vocab_size=300",
                                  "data.val_fraction=0.97", "data.seq_len=512", "data.max_documents=null",
                                  "data.dir={w.root}/cases/short/data", "run.root={w.root}/cases/short/runs"),
         "data.seq_len: the training split", setup=short_train_split, timeout=120, writes=True, progress=True),
    Case("seq-len-too-long", train("run.name=x", "data.seq_len=100000"), "data.seq_len"),
    # -- train: what happens during training --
    Case("damaged-last-falls-back", train("run.root={w.root}/cases/fallback/runs", "run.name=r",
                                          "trainer.max_steps=6"),
         code=0, setup=damaged_run("truncated", "fallback"), process=True, writes=True, owns="cases/fallback",
         check=resumed_from_the_step_file),
    Case("nan-learning-rate", train(*NAN), "training stopped at step 5: 3 optimizer steps in a row (3-5)",
         process=True, writes=True, check=stopped_with_finite_weights),
    # -- prepare-data: what a source holds --
    Case("source-empty-files", prep("empty"), "hold no text", progress=True),
    Case("source-binary", prep("binary"), "a binary file (a NUL byte"),
    Case("source-no-text-kinds", prep("binkind"), "holds no text, jsonl, json, parquet or arrow files (only .bin); "
                                                  "set data.glob"),
    Case("source-latin-1", prep("latin"), "not valid utf-8"),
    Case("source-gzip-truncated", prep("gzcut"), "a.txt.gz: not a readable gzip file"),
    Case("source-saved-no-split", prep("saved", "data.hf_split=validation"),
         "has no split 'validation' (its splits: train)"),
    Case("source-saved-no-field", prep("saved", "data.text_field=body"), "data.text_field: "),
    Case("source-glob-no-match", prep("long", "data.glob='*.csv'"), "data.glob: '*.csv' matches no files"),
    Case("source-latin-1-on-purpose", prep("latin", "data.encoding=latin-1"), code=0, writes=True,
         check=prepared("prep-latin-latin-1")),
    Case("source-json-int", prep("jint/*.jsonl"), "d.jsonl: line 7: data.text_field 'text' is a int"),
    Case("source-json-bad-line", prep("jbad/*.jsonl"), "d.jsonl: line 7: not JSON"),
    Case("source-json-no-field", prep("jfield/*.jsonl"), "d.jsonl: line 7: no 'text' field"),
    Case("source-parquet-ints", prep("parquet/*.parquet"), "d.parquet: column 'text' (data.text_field) holds int64"),
    Case("source-no-match", prep("nothing/*.txt"), "no files match"),
    Case("source-no-files", prep("nofiles"), "holds no files"),
    Case("source-2mb-line", prep("long"), code=0, timeout=120, writes=True, check=prepared("prep-long")),
    Case("data-dir-read-only", lambda w: ["prepare-data", DEBUG, "data.source=stdlib", "data.vocab_size=300",
                                          f"data.dir={w.read_only}/data"], "data.dir: cannot write",
         needs="read_only"),
    Case("data-dir-other-inputs", lambda w: ["prepare-data", DEBUG, *TINY_DATA, "data.vocab_size=600",
                                             f"data.dir={w.data}"], "data.dir"),
    Case("data-dir-damaged-prepare", lambda w: ["prepare-data", DEBUG, *TINY_DATA,
                                                f"data.dir={w.root}/cases/data-meta/data"], "meta.json: damaged"),
    # -- generate, eval-length, export, inspect, bench: reading checkpoints --
    Case("generate-crafted", cmd("generate", "{w.root}/evil.ckpt"), "evil.ckpt: refused"),
    Case("generate-crafted-raw", cmd("generate", "{w.root}/evil_raw.ckpt"), "evil_raw.ckpt: damaged"),
    Case("generate-random", cmd("generate", "{w.root}/random.ckpt"), "random.ckpt: damaged"),
    Case("generate-truncated", cmd("generate", "{w.root}/trunc.ckpt"), "trunc.ckpt: damaged"),
    Case("generate-missing", cmd("generate", "{w.root}/none"), "none: no checkpoint there"),
    Case("generate-not-a-run", cmd("generate", "{w.root}/foreign"), "foreign: no intact checkpoint"),
    Case("generate-top-k", cmd("generate", "{w.run}", "--top-k", "-5"), "--top-k"),
    Case("generate-temperature", cmd("generate", "{w.run}", "--temperature", "-1"), "--temperature"),
    Case("generate-max-new", cmd("generate", "{w.run}", "--max-new-tokens", "0"), "--max-new-tokens"),
    Case("generate-token-stats", cmd("generate", "{w.run}", "--show-token-stats"), "--show-token-stats"),
    Case("generate-damaged-last", cmd("generate", "{w.root}/cases/run-truncated/runs/r", "--prompt", "def ",
                                      "--max-new-tokens", "4", "--temperature", "0"), code=0, check=note_and_text,
         setup=damaged_run("truncated", "run-truncated")),
    Case("eval-crafted", cmd("eval-length", "{w.root}/evil.ckpt"), "evil.ckpt: refused"),
    Case("eval-truncated", cmd("eval-length", "{w.root}/trunc.ckpt"), "trunc.ckpt: damaged"),
    Case("eval-lengths", cmd("eval-length", "{w.run}", "--lengths", "64,x"), "--lengths"),
    Case("eval-batch-tokens", cmd("eval-length", "{w.run}", "--batch-tokens", "0"), "--batch-tokens"),
    Case("eval-data-missing", cmd("eval-length", "{w.run}", "--data", "{w.root}/nothing"), "--data: no files match"),
    Case("eval-set-not-model", cmd("eval-length", "{w.run}", "--set", "data.seq_len=64"),
         "data.seq_len=64: only model.* keys can be changed on a trained model"),
    Case("eval-set-unknown", cmd("eval-length", "{w.run}", "--set", "model.attention.windw=4"),
         "model.attention.windw: unknown key"),
    Case("retrieval-set-misfit", cmd("eval-retrieval", "{w.run}", "--set", "model.n_layers=5"),
         "its weights do not fit its config"),
    Case("generate-exit-no-exits", cmd("generate", "{w.run}", "--exit", "state", "--threshold", "0.9"),
         "--exit: this model has no exits (model.depth.kind=fixed)"),
    Case("generate-threshold-alone", cmd("generate", "{w.run}", "--threshold", "0.9"),
         "--threshold and --exit-layers: give them with --exit"),
    Case("calibrate-exit-no-exits", cmd("calibrate-exit", "{w.run}"), "this model has no exits"),
    Case("calibrate-exit-delta", cmd("calibrate-exit", "{w.run}", "--delta", "1.5"), "--delta and --epsilon"),
    Case("calibrate-exit-layers", cmd("calibrate-exit", "{w.run}", "--exit-layers", "first"),
         "--exit-layers first: give comma-separated layers"),
    Case("generate-exit-layers-alone", cmd("generate", "{w.run}", "--exit-layers", "1"),
         "--threshold and --exit-layers: give them with --exit"),
    Case("eval-exit-thresholds", cmd("eval-exit", "{w.run}", "--thresholds", "0.9,x"), "--thresholds 0.9,x"),
    Case("bench-decode-no-exits", cmd("bench", "decode", "{w.run}", "--threshold", "0.9"), "this model has no exits"),
    Case("bench-decode-timed-prompts", cmd("bench", "decode", "{w.run}", "--timed-prompts", "0"),
         "--timed-prompts and --agreement-prompts must be at least 1"),
    Case("bench-decode-exit-layers", cmd("bench", "decode", "{w.run}", "--exit-layers", "1,x"),
         "--exit-layers 1,x: give comma-separated layers"),
    Case("retrieval-crafted", cmd("eval-retrieval", "{w.root}/evil.ckpt"), "evil.ckpt: refused"),
    Case("retrieval-lengths", cmd("eval-retrieval", "{w.run}", "--lengths", "64,x"), "--lengths"),
    Case("retrieval-trials", cmd("eval-retrieval", "{w.run}", "--trials", "0"), "--trials: must be at least 1"),
    Case("retrieval-task", cmd("eval-retrieval", "{w.run}", "--task", "sort"), "--task"),
    Case("retrieval-copy-on-text", cmd("eval-retrieval", "{w.run}", "--task", "copy"), "not on the copy task"),
    Case("export-hf-max-length", cmd("export", "{w.run}", "--format", "hf", "--max-length", "0", "--out", "{w.root}/o"),
         "--max-length 0: must be positive"),
    Case("eval-harness-unknown-task", cmd("eval-harness", "{w.run}", "--tasks", "no_such_task"),
         "--tasks: unknown task(s) no_such_task; local tasks: lmtrain_python_mc"),
    Case("eval-harness-limit", cmd("eval-harness", "{w.run}", "--tasks", "lmtrain_python_mc", "--limit", "0"),
         "--limit 0: must be positive"),
    Case("export-bad-format", cmd("export", "{w.run}", "--format", "onnx", "--out", "{w.root}/o"),
         "invalid choice: 'onnx'"),
    Case("export-crafted", cmd("export", "{w.root}/evil.ckpt", "--out", "{w.root}/o"), "evil.ckpt: refused"),
    Case("export-truncated", cmd("export", "{w.root}/trunc.ckpt", "--out", "{w.root}/o"), "trunc.ckpt: damaged"),
    Case("export-onto-foreign", cmd("export", "{w.run}", "--out", "{w.root}/foreign"), "foreign: exists and is not"),
    Case("export-beside-foreign-partial", cmd("export", "{w.run}", "--out", "{w.root}/cases/partial/exp"), code=0,
         setup=foreign_partial, writes=True, check=partial_untouched),
    Case("inspect-crafted", cmd("inspect", "{w.root}/evil.ckpt"), "evil.ckpt: refused"),
    Case("inspect-random", cmd("inspect", "{w.root}/random.ckpt"), "random.ckpt: damaged"),
    Case("inspect-windows", cmd("inspect", "{w.run}", "--windows", "0"), "--windows"),
    Case("bench-act-crafted", cmd("bench", "act", "{w.root}/evil.ckpt"), "evil.ckpt: refused"),
    Case("bench-act-not-act", cmd("bench", "act", "{w.run}"), "it needs an ACT model"),
    Case("bench-attention-kind", cmd("bench", "attention", "--kind", "nope"), "--kind nope"),
    Case("bench-attention-lengths", cmd("bench", "attention", "--kind", "performer", "--lengths", "1k"), "--lengths"),
    Case("bench-attention-option-key", cmd("bench", "attention", "--kind", "sparse", "--option", "windw=3"),
         "--option 'windw=3'"),
    Case("bench-attention-option-value", cmd("bench", "attention", "--kind", "sparse", "--option", "window=-1"),
         "model.attention.window=-1"),
    Case("bench-attention-patterns-kind", cmd("bench", "attention", "--kind", "performer", "--patterns", "window"),
         "--patterns is for --kind sparse"),
    Case("bench-attention-unknown-pattern", cmd("bench", "attention", "--kind", "sparse", "--patterns", "windw"),
         "unknown pattern 'windw'"),
    Case("bench-memory-residual", cmd("bench", "memory", "--residual", "fancy"), "--residual"),
    Case("bench-memory-set-kind", cmd("bench", "memory", "--set", "model.attention.kind=nope"),
         "model.attention.kind: unknown kind 'nope'"),
    Case("bench-memory-set-form", cmd("bench", "memory", "--set", "nonsense"),
         "nonsense: an override must look like key=value"),
    Case("bench-train-peer", cmd("bench", "train", DEBUG, "--vs", "gpt5"), "unknown peer"),
    Case("bench-train-lengths", cmd("bench", "train", DEBUG, "--lengths", "4k"),
         "--lengths 4k: give comma-separated integers"),
    Case("bench-train-length-odd", cmd("bench", "train", DEBUG, "trainer.sequence_parallel=2", "trainer.devices=2",
                                       "trainer.strategy=ddp", "--lengths", "4095"),
         "must divide data.seq_len=4095"),
    # -- plan, submit --
    Case("plan-gpus", cmd("plan", DEBUG, "--gpus", "0"), "--gpus"),
    Case("plan-gpu-mem", cmd("plan", DEBUG, "--gpu-mem", "1"), "--gpu-mem"),
    Case("submit-partition", cmd("submit", DEBUG, "slurm.partition=a;b", "--dry-run"), "slurm.partition"),
    Case("submit-time", cmd("submit", DEBUG, "slurm.time=soon", "--dry-run"), "slurm.time"),
    Case("submit-eval-args", cmd("submit", DEBUG, "--eval-length", "--lengths 64 --bogus", "--dry-run"),
         "--eval-length"),
    Case("submit-extra-owned", cmd("submit", DEBUG, "slurm.extra=[--time=5]", "--dry-run"),
         "slurm.extra: --time is not allowed here (set it with slurm.time)"),
    Case("submit-extra-shell", cmd("submit", DEBUG, "slurm.extra=['--comment=$(id)']", "--dry-run"),
         "slurm.extra: '--comment=$(id)' is not allowed here"),
    Case("submit-dependency", cmd("submit", DEBUG, "--dependency", "after:x", "--dry-run"),
         "--dependency: 'after:x' is not a SLURM dependency"),
    Case("submit-sweep-shape", cmd("submit", DEBUG, "--sweep", "optim.lr", "--dry-run"), "--sweep optim.lr: write"),
    Case("submit-sweep-resources", cmd("submit", DEBUG, "--sweep", "slurm.time=10,20", "--dry-run"),
         "these differ between them: time"),
    Case("submit-sweep-bad-value", cmd("submit", DEBUG, "--sweep", "optim.lr=1e-3,fast", "--dry-run"),
         "optim.lr: wrong type"),
    # -- the keys of everyday use --
    Case("glob-not-a-directory", cfg("data.glob='*.txt'"), "data.glob: chooses files of a directory data.source"),
    Case("hub-key-on-local-source", cfg("data.hf_revision=main"), "data.hf_revision: applies to a Hugging Face"),
    Case("loggers-unknown", cfg("trainer.loggers=[tensorboard,mlflow]"),
         "trainer.loggers: 'mlflow' is not one of tensorboard, csv, wandb"),
    Case("loggers-twice", cfg("trainer.loggers=[csv,csv]"), "trainer.loggers: a logger is named twice"),
    Case("wandb-mode", cfg("wandb.mode=cloud"), "wandb.mode: 'cloud' is not one of online, offline, disabled"),
    Case("describe-bad-key", cmd("config", "--describe", DEBUG, "model.n_layer=2"),
         "model.n_layer: unknown key (did you mean model.n_layers?)"),
    Case("config-no-preset", cmd("config"), "config: give a preset"),
]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file under root: size, mtime and (for small files) a content hash."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            digest = hashlib.sha1(p.read_bytes()).hexdigest() if st.st_size < (1 << 20) else ""
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, digest)
    return out


class Timeout(Exception):
    pass


def run_in_process(argv: list[str], timeout: int, capsys) -> tuple[int, str, str]:
    from lmtrain.cli import main

    def alarm(signum, frame):
        raise Timeout(f"lmtrain {' '.join(argv[:3])} ran past {timeout} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(timeout)
    try:
        try:
            code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_catalogue_is_large_and_covers_every_command():
    commands = {c.argv(Workspace(Path("/w"), Path("/w/d"), Path("/w/r"), Path("/m"), Path("/ro")))[0] for c in CASES}
    assert len(CASES) >= 60
    assert commands >= {"config", "train", "prepare-data", "generate", "eval-length", "export", "inspect", "bench",
                        "plan", "submit", "eval-retrieval", "calibrate-exit", "eval-exit"}
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, ws: Workspace, capsys, monkeypatch):
    if case.needs == "read_only" and ws.read_only is None:
        pytest.skip("needs a read-only filesystem: mounting a read-only tmpfs needs root")
    monkeypatch.chdir(ws.root)
    argv = case.argv(ws)
    before = snapshot(ws.root)
    if case.process:
        proc = run_cli(*argv, cwd=ws.root, timeout=case.timeout)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        code, out, err = run_in_process(argv, case.timeout, capsys)
    assert not ws.marker.exists(), "a crafted pickle ran"
    assert code == case.code, f"exit {code}:\n{out[-2000:]}\n{err[-3000:]}"
    if case.code == 2:
        errors = [line for line in err.splitlines() if line.startswith("lmtrain: error:")]
        assert len(errors) == 1 and case.expect in errors[0], err[-3000:]
        if not (case.process or case.progress):  # nothing but the error was printed
            assert err.strip() == errors[0], err
        assert err.strip().splitlines()[-1] == errors[0]
    if case.check is not None:
        case.check(ws, out, err)
    after = snapshot(ws.root)
    changed = [p for p in before if after.get(p) != before[p] and not (case.owns and p.startswith(case.owns + "/"))]
    assert not changed, f"existing files changed or removed: {changed[:5]}"
    if not case.writes:
        assert sorted(after) == sorted(before), f"files written: {sorted(set(after) - set(before))[:5]}"


def test_the_workspace_run_is_intact(ws):
    """The cases ran against these files; they are still what training wrote."""
    from lmtrain.train.checkpoint import checkpoint_step, load_trained

    assert checkpoint_step(ws.run / "checkpoints" / "last.ckpt") == 4
    assert load_trained(ws.run).step == 4
    assert sys.modules.get("lmtrain")  # imported in this process: the cases ran in it
