"""Length-extrapolation evaluation: the window plans, the scores against a direct
computation, the report files, the CLI, the training callback, and the memory bound."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmtrain.config import load_config
from lmtrain.evaluate.length import EvalError, Plan, evaluate_length, resolve_stride, scored_range
from lmtrain.model import build_model
from tests.conftest import CONFIGS, ROOT, TINY_MODEL, run_cli

DEBUG = str(CONFIGS / "debug.yaml")


def targets_of(plan: Plan) -> list[int]:
    """Stream indices of the scored targets, in plan order."""
    out = []
    for w in plan.windows():
        out += [w.start + 1 + p for p in range(w.first_scored, w.length)]
    return out


@pytest.mark.parametrize("mode,length,stride,n", [
    ("nonoverlap", 16, None, 64), ("nonoverlap", 16, None, 70), ("sliding", 16, 4, 64), ("sliding", 16, 5, 70),
    ("sliding", 16, 1, 33), ("sliding", 16, 16, 48), ("nonoverlap", 48, None, 48),
])
def test_every_target_is_scored_once_with_its_context(mode, length, stride, n):
    offset = 48
    plan = Plan(mode, length, resolve_stride(mode, length, stride), offset, n)
    assert targets_of(plan) == list(range(offset, offset + n))
    s = plan.stride if mode == "sliding" else length
    for w in plan.windows():
        assert w.start >= 0 and w.length == length
        # a scored target at position p has p tokens of context: at least L - S
        assert w.first_scored >= length - s
    assert plan.n_windows() == len(list(plan.windows()))


def test_sliding_with_stride_length_is_nonoverlap():
    for n in (64, 70):
        a = list(Plan("nonoverlap", 16, 16, 32, n).windows())
        b = list(Plan("sliding", 16, 16, 32, n).windows())
        assert a == b


def test_scored_range_is_shared_by_all_lengths():
    offset, n = scored_range(10_000, [128, 256, 512], max_tokens=3000)
    assert offset == 512 and n == 2560  # rounded down to a multiple of the longest length
    assert scored_range(10_000, [128], None) == (128, 9856)  # targets 128..9983 < 10,000
    with pytest.raises(EvalError, match="--lengths"):
        scored_range(400, [512], None)
    with pytest.raises(EvalError, match="--stride"):
        resolve_stride("sliding", 64, 65)


@pytest.fixture(scope="module")
def tiny_model(tiny_data):
    torch.manual_seed(0)
    cfg = load_config(DEBUG, [*tiny_data, *TINY_MODEL, "model.position=alibi"])
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def stream():
    return np.random.default_rng(0).integers(0, 512, size=3000).astype(np.uint16)


def direct_loss(model, tokens, plan: Plan) -> tuple[float, int]:
    """The plain computation: full logits of each window, cross-entropy of the scored part."""
    losses = []
    with torch.no_grad():
        for w in plan.windows():
            seq = torch.from_numpy(np.asarray(tokens[w.start : w.start + w.length + 1], dtype=np.int64))[None]
            logits = model(seq[:, :-1]).logits_BLV[0, w.first_scored :]
            losses.append(F.cross_entropy(logits.double(), seq[0, 1 + w.first_scored :], reduction="none"))
    allv = torch.cat(losses)
    return float(allv.mean()), allv.numel()


@pytest.mark.parametrize("mode,stride", [("nonoverlap", None), ("sliding", 16), ("sliding", 7)])
def test_reported_loss_equals_a_direct_computation(tiny_model, stream, mode, stride):
    offset, n = scored_range(len(stream), [32, 64], max_tokens=700)
    plan = Plan(mode, 64, resolve_stride(mode, 64, stride), offset, n)
    r = evaluate_length(tiny_model, stream, plan, batch_tokens=200, buckets_per_octave=2)
    want, count = direct_loss(tiny_model, stream, plan)
    assert r.status == "ok" and r.tokens_scored == count == n
    assert r.loss == pytest.approx(want, rel=1e-6)
    assert r.ppl == pytest.approx(math.exp(want), rel=1e-6)
    # the per-position buckets partition the scored tokens
    assert sum(r.bucket_tokens) == n
    weighted = sum(l * t for l, t in zip(r.bucket_loss, r.bucket_tokens) if t) / n
    assert weighted == pytest.approx(r.loss, rel=1e-9)
    edges = r.bucket_edges
    assert edges[0] == 0 and edges[-1] == 64 and edges == sorted(set(edges))
    for lo, hi, t in zip(edges, edges[1:], r.bucket_tokens):
        # each position of the bucket is scored once per window that scores it
        scored = [p for w in plan.windows() for p in range(w.first_scored, w.length) if lo <= p < hi]
        assert t == len(scored)


def test_nonoverlap_and_sliding_agree_when_stride_is_length(tiny_model, stream):
    offset, n = scored_range(len(stream), [64], max_tokens=640)
    a = evaluate_length(tiny_model, stream, Plan("nonoverlap", 64, 64, offset, n), batch_tokens=256)
    b = evaluate_length(tiny_model, stream, Plan("sliding", 64, 64, offset, n), batch_tokens=256)
    assert a.loss == b.loss and a.bucket_loss == b.bucket_loss and a.tokens_scored == b.tokens_scored == n


def test_batching_does_not_change_the_numbers(tiny_model, stream):
    offset, n = scored_range(len(stream), [64], max_tokens=640)
    plan = Plan("sliding", 64, 24, offset, n)
    a = evaluate_length(tiny_model, stream, plan, batch_tokens=64)
    b = evaluate_length(tiny_model, stream, plan, batch_tokens=4096)
    assert a.loss == pytest.approx(b.loss, rel=1e-6)


def test_learned_positions_beyond_their_table_are_reported_not_a_crash(tiny_data, stream):
    cfg = load_config(DEBUG, [*tiny_data, *TINY_MODEL, "model.position=learned"])
    model = build_model(cfg).eval()
    offset, n = scored_range(len(stream), [64, 128], max_tokens=256)
    ok = evaluate_length(model, stream, Plan("nonoverlap", 64, 64, offset, n))
    na = evaluate_length(model, stream, Plan("nonoverlap", 128, 128, offset, n))
    assert ok.status == "ok"
    assert na.status == "unsupported" and "learned positions end at 64" in na.reason
    assert na.to_dict()["ppl"] is None


# ---------------------------------------------------------------- CLI, reports, TensorBoard


@pytest.fixture(scope="module")
def trained_runs(tiny_data, tmp_path_factory):
    """Two tiny trained runs (ALiBi and learned positions) on the same data."""
    root = tmp_path_factory.mktemp("evalruns")
    for pos in ("alibi", "learned"):
        run_cli("train", DEBUG, *tiny_data, *TINY_MODEL, f"model.position={pos}", "trainer.max_steps=6",
                "trainer.val_every_n_steps=6", "checkpoint.every_n_steps=6", f"run.root={root}", f"run.name={pos}",
                "trainer.progress_bar=false", check=True)
    return root


def test_cli_writes_the_report_and_logs_tensorboard(trained_runs, tmp_path):
    runs = [str(trained_runs / "alibi"), str(trained_runs / "learned")]
    out = tmp_path / "cmp"
    proc = run_cli("eval-length", *runs, "--lengths", "32,64,128", "--mode", "sliding", "--stride", "16",
                   "--max-tokens", "512", "--out", str(out), check=True)
    assert "| alibi | alibi | 64 |" in proc.stdout and "n/a [1]" in proc.stdout
    assert "learned positions end at 64" in proc.stdout
    for d in (out, trained_runs / "alibi" / "eval", trained_runs / "learned" / "eval"):
        names = sorted(p.name for p in d.iterdir())
        assert names == ["length_sliding.csv", "length_sliding.json", "length_sliding.md",
                         "length_sliding_positions.csv", "length_sliding_positions.png", "length_sliding_ppl.png"]
    rep = json.loads((out / "length_sliding.json").read_text())
    assert rep["scored_tokens"] == 512 and rep["scored_offset"] == 128 and rep["lengths"] == [32, 64, 128]
    assert [r["name"] for r in rep["runs"]] == ["alibi", "learned"]
    by_len = {r["length"]: r for r in rep["runs"][0]["results"]}
    assert all(r["tokens_scored"] == 512 and r["status"] == "ok" for r in by_len.values())
    assert rep["runs"][1]["results"][2]["status"] == "unsupported"
    assert (out / "length_sliding_ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv_rows = (out / "length_sliding.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 2 * 3

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trained_runs / "alibi" / "tb"), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = acc.Tags()
    assert "eval_length/sliding/ppl_L128" in tags["scalars"]
    assert "eval_length/sliding/ppl_vs_length" in tags["images"]
    ev = acc.Scalars("eval_length/sliding/ppl_L64")[-1]
    assert ev.step == 6 and ev.value == pytest.approx(by_len[64]["ppl"], rel=1e-5)

    # evaluated twice: identical numbers
    run_cli("eval-length", runs[0], "--lengths", "32,64,128", "--mode", "sliding", "--stride", "16",
            "--max-tokens", "512", "--out", str(tmp_path / "again"), "--no-tensorboard", check=True)
    again = json.loads((tmp_path / "again" / "length_sliding.json").read_text())
    assert [r["loss"] for r in again["runs"][0]["results"]] == [r["loss"] for r in rep["runs"][0]["results"]]


def test_cli_scores_other_text_with_the_models_tokenizer(trained_runs, tmp_path):
    text = tmp_path / "text.py"
    text.write_text((ROOT / "lmtrain" / "config.py").read_text())
    proc = run_cli("eval-length", str(trained_runs / "alibi"), "--lengths", "64,128", "--data", str(text),
                   "--max-tokens", "256", "--out", str(tmp_path / "o"), "--no-tensorboard", check=True)
    rep = json.loads((tmp_path / "o" / "length_nonoverlap.json").read_text())
    assert str(text) in rep["data"] and rep["scored_tokens"] == 256, proc.stderr


@pytest.mark.parametrize("args,key", [
    (["--lengths", "64,x"], "--lengths"), (["--lengths", "64", "--mode", "sliding", "--stride", "100"], "--stride"),
    (["--lengths", "100000"], "--lengths"), (["--batch-tokens", "0"], "--batch-tokens"),
    (["--max-tokens", "-1"], "--max-tokens"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(trained_runs, tmp_path, args, key):
    before = sorted(p.relative_to(trained_runs) for p in trained_runs.rglob("*"))
    proc = run_cli("eval-length", str(trained_runs / "alibi"), *args, "--out", str(tmp_path / "o"))
    assert proc.returncode == 2, proc.stderr
    assert key in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "o").exists()
    assert sorted(p.relative_to(trained_runs) for p in trained_runs.rglob("*")) == before


def test_missing_run_exits_2(tmp_path):
    proc = run_cli("eval-length", str(tmp_path / "nope"))
    assert proc.returncode == 2 and "no checkpoint" in proc.stderr


# ---------------------------------------------------------------- during training


def test_periodic_evaluation_logs_and_leaves_training_unchanged(tiny_data, tmp_path):
    from lmtrain.train.callbacks.metrics_file import read_metrics
    from lmtrain.train.run import train

    common = [*tiny_data, *TINY_MODEL, "model.dropout=0.1", "trainer.max_steps=8", "trainer.val_every_n_steps=4",
              "checkpoint.every_n_steps=100", "trainer.progress_bar=false", f"run.root={tmp_path}"]
    train(load_config(DEBUG, [*common, "run.name=plain"]), log=lambda s: None)
    train(load_config(DEBUG, [*common, "run.name=evald", "eval.lengths=[32,128]", "eval.max_tokens=256"]),
          log=lambda s: None)
    assert read_metrics(tmp_path / "plain" / "metrics.jsonl") == read_metrics(tmp_path / "evald" / "metrics.jsonl")
    ppl = read_metrics(tmp_path / "evald" / "metrics.jsonl", "eval_length/sliding/ppl_L128")
    assert sorted(ppl) == [4, 8] and all(math.isfinite(v) and v > 1 for v in ppl.values())


def test_eval_config_is_checked(tiny_data):
    from lmtrain.config import ConfigError

    with pytest.raises(ConfigError, match="eval.mode"):
        load_config(DEBUG, ["eval.mode=strided"])
    with pytest.raises(ConfigError, match="eval.stride"):
        load_config(DEBUG, ["eval.lengths=[64]", "eval.stride=65"])


# ---------------------------------------------------------------- memory


MEMORY_SCRIPT = r"""
import resource, sys, numpy as np, torch
from lmtrain.config import load_config
from lmtrain.evaluate.length import Plan, evaluate_length, scored_range
from lmtrain.model import build_model
torch.manual_seed(0)
cfg = load_config("configs/default.yaml", [f"model.position={sys.argv[1]}"])
model = build_model(cfg).eval()
L = 16384
tokens = np.random.default_rng(0).integers(0, cfg.data.vocab_size, size=2 * L + 1)
r = evaluate_length(model, tokens, Plan("nonoverlap", L, L, *scored_range(len(tokens), [L], L)))
assert r.status == "ok" and r.tokens_scored == L
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


@pytest.mark.parametrize("position", ["alibi", "rope"])
def test_default_model_at_16k_tokens_fits_in_3_gb(position):
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, position], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak_mb = int(proc.stdout.split()[-1])
    assert peak_mb < 3 * 1024, f"peak RSS {peak_mb} MB at 16k tokens"
