"""What many tests share: paths, the tiny configs, running the CLI, building small models, the
registry-wide property assertions, and the pairwise combinations of kinds.

Pairwise: the decoder has five axes (position, attention, ffn, residual, depth). Their full
product grows with every kind; `pairwise_combos()` picks, among the valid combinations,
a small set in which every valid pair of kinds of two axes occurs at least once (a greedy
covering array), so adding a kind adds about as many combinations as the largest other
axis has kinds, not a product's worth.
"""

from __future__ import annotations

import functools
import itertools
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DEBUG = str(CONFIGS / "debug.yaml")

# Small and fast, but a real pipeline: the stdlib corpus, a trained BPE, packed shards.
TINY_DATA = ["data.source=stdlib", "data.vocab_size=512", "data.max_documents=120", "data.val_fraction=0.05",
             "data.num_workers=0"]
TINY_MODEL = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.d_ff=256"]

# The models of the property tests: tiny, a vocabulary of V ids.
V = 97
PROPERTY_MODEL = ["model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.d_ff=64", "data.vocab_size=257",
                  "data.seq_len=48"]


# -- the CLI -------------------------------------------------------------------------------------
def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env_extra: dict | None = None,
            check: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", "lmtrain", *args], cwd=cwd or ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"lmtrain {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def train_twice_from_a_checkpoint(args: list[str], root: Path, *, at: int = 4, compare=(6, 8)) -> Path:
    """`lmtrain train ARGS` as run `a`, then as run `b` starting from a's checkpoint at step
    `at`; asserts that b's logged metrics equal a's at the steps `compare`. Returns a's dir."""
    import shutil

    from lmtrain.train.callbacks.metrics_file import read_metrics

    run_cli("train", *args, "run.name=a", check=True)
    run = root / "a"
    (root / "b" / "checkpoints").mkdir(parents=True)
    name = f"step{at:06d}.ckpt"
    shutil.copy(run / "checkpoints" / name, root / "b" / "checkpoints" / name)
    run_cli("train", *args, "run.name=b", check=True)
    want, got = read_metrics(run / "metrics.jsonl"), read_metrics(root / "b" / "metrics.jsonl")
    assert [got[s] for s in compare] == [want[s] for s in compare]
    return run


def flex_vs_reference_logits(model, x) -> None:
    """The model's logits on the flex path (eager on CPU) equal its reference paths'."""
    from lmtrain.model.attention import reference_paths

    with torch.no_grad():
        flex = model(x).logits_BLV
        with reference_paths():
            ref = model(x).logits_BLV
    torch.testing.assert_close(flex, ref, rtol=1e-4, atol=1e-4)
    assert all(k.path_counts["flex"] >= 1 for k in model.attention_kernels())


def train_and_signal(args: list[str], metrics: Path, after_step: int, timeout: float = 300) -> tuple[int, str]:
    """Start `lmtrain train ARGS`, send SIGUSR1 once metrics.jsonl shows `after_step`, and wait:
    (exit code, stdout + stderr)."""
    import signal
    import time

    from lmtrain.train.callbacks.metrics_file import read_metrics

    proc = subprocess.Popen([sys.executable, "-m", "lmtrain", "train", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if metrics.exists() and max(read_metrics(metrics), default=0) >= after_step:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def arg_value(args: list[str], key: str) -> str:
    """The value of `key=...` among CLI overrides."""
    return next(a for a in args if a.startswith(f"{key}=")).split("=", 1)[1]


# -- tokenizers ------------------------------------------------------------------------------------
def llama_style_tokenizer(folder: Path, vocab_size: int = 300) -> Path:
    """A pretrained-tokenizer directory as transformers saves one: `<unk>`, `<s>`, `</s>` at ids
    0-2, a template that puts `<s>` before every encoding, and a tokenizer_config.json naming
    them. Its size (`vocab_size`) is not a multiple of 64. Returns `folder`."""
    import json
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    texts = [p.read_text(encoding="utf-8") for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[a-c]*.py"))]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return folder


# -- memory ----------------------------------------------------------------------------------------
def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while `fn()` runs (its result is
    dropped before returning)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


# -- models ------------------------------------------------------------------------------------------
def property_config(*overrides: str):
    from lmtrain.config import load_config

    return load_config(DEBUG, [*PROPERTY_MODEL, *overrides])


def make_model(*overrides: str, dtype=torch.float64, seed: int = 0, train: bool = False):
    """A tiny property-test model (eval mode unless `train`), in `dtype`."""
    from lmtrain.model import build_model

    cfg = property_config(*overrides)
    torch.manual_seed(seed)
    model = build_model(cfg).to(dtype)
    return model.train() if train else model.eval()


def axis_overrides(axis: str, kind: str) -> list[str]:
    """`kind` on `axis` with the options its variant asks the property tests to use."""
    from lmtrain.model.axes import AXES

    variant = AXES[axis].get(kind)
    return [f"model.{axis}.kind={kind}", *(f"model.{axis}.{k}={v}" for k, v in variant.test_options.items())]


def combo_overrides(combo: dict[str, str]) -> list[str]:
    return [o for axis, kind in combo.items() for o in axis_overrides(axis, kind)]


def combo_id(combo: dict[str, str]) -> str:
    return "-".join(combo.values())


@functools.cache
def valid_combos() -> tuple[tuple[tuple[str, str], ...], ...]:
    """Every combination of kinds, one per axis, that the variants' checks accept (asked
    through the assembly directly: the full loader would take a minute for the product)."""
    from dataclasses import replace

    from lmtrain.model.axes import AXES, Assembly

    base = property_config()
    axes = list(AXES)
    out = []
    for kinds in itertools.product(*(sorted(AXES[a]) for a in axes)):
        nodes = {a: AXES[a].config(k, **AXES[a].get(k).test_options) for a, k in zip(axes, kinds)}
        if not Assembly.of(replace(base.model, **nodes), base.data.seq_len).check():
            out.append(tuple(zip(axes, kinds)))
    return tuple(out)


@functools.cache
def pairwise_combos() -> tuple[tuple[tuple[str, str], ...], ...]:
    """Valid combinations covering every pair of kinds (of two axes) that some valid
    combination holds; greedy, deterministic."""
    combos = valid_combos()

    def pairs(c):
        return {(a, b) for a, b in itertools.combinations(c, 2)}

    uncovered = set().union(*(pairs(c) for c in combos))
    chosen = []
    while uncovered:
        best = max(combos, key=lambda c: len(pairs(c) & uncovered))
        chosen.append(best)
        uncovered -= pairs(best)
    return tuple(chosen)


def variant_overrides(axis: str, kind: str) -> list[str]:
    """`kind` on `axis`, in the first pairwise combination that holds it (so that the other
    axes' kinds accept it)."""
    combo = next(dict(c) for c in pairwise_combos() if (axis, kind) in c)
    return combo_overrides(combo)


# -- registry-wide property assertions -------------------------------------------------------------
def assert_causal(model, t: int = 23, L: int = 40):
    """Changing the tokens after position t leaves the logits up to t unchanged (and changes
    later ones). Returns both outputs."""
    x = torch.randint(0, V, (2, L))
    y = x.clone()
    y[:, t + 1 :] = torch.randint(0, V, (2, L - t - 1))
    out_x, out_y = model(x), model(y)
    a, b = out_x.logits_BLV, out_y.logits_BLV
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-12)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])
    return out_x, out_y


def assert_batch_equals_one_by_one(model, x=None):
    """A batch's logits equal those of its samples run one by one; returns the batch's."""
    x = torch.randint(0, V, (3, 33)) if x is None else x
    batched = model(x).logits_BLV
    single = torch.cat([model(x[i : i + 1]).logits_BLV for i in range(x.shape[0])])
    torch.testing.assert_close(batched, single, rtol=1e-10, atol=1e-10)
    return batched


def fast_vs_reference(model, x):
    """Logits and parameter gradients of the model's fast paths, then of its reference paths."""
    from lmtrain.model.attention import reference_paths

    results = []
    for reference in (False, True):
        model.zero_grad()
        with reference_paths(reference):
            out = model(x)
        loss = F.cross_entropy(out.logits_BLV.flatten(0, 1).float(), x.roll(-1, 1).flatten())
        aux = out.aux.total_loss()
        (loss if aux is None else loss + aux).backward()
        results.append((out.logits_BLV.detach().clone(),
                        {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}))
    return results


def kernel_tolerance(model, dtype) -> dict:
    """The loosest of the model's kernels' declared tolerances for `dtype`."""
    tols = [k.tolerances[dtype] for k in model.attention_kernels()]
    return dict(rtol=max(t.rtol for t in tols), atol=max(t.atol for t in tols))


def none_position(d_model: int, n_heads: int):
    from lmtrain.model.positions import build_position

    return build_position("none", d_model=d_model, n_heads=n_heads, seq_len=0)


def call_kernel(kernel, q, k, v, *, position=None, q_pos=None, k_pos=None, reference: bool = False):
    """A kernel's output on q, k, v with aligned positions by default (no positional scheme)."""
    from lmtrain.model.attention import AttentionInputs, reference_paths
    from lmtrain.model.outputs import Aux

    L, S = q.shape[2], k.shape[2]
    position = position or none_position(q.shape[1] * q.shape[3], q.shape[1])
    q_pos = torch.arange(S - L, S) if q_pos is None else q_pos
    k_pos = torch.arange(S) if k_pos is None else k_pos
    with reference_paths(reference):
        return kernel(q, k, v, AttentionInputs(position=position, q_pos=q_pos, k_pos=k_pos, aux=Aux()))
