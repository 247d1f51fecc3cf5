"""Length evaluation end to end: `lmtrain eval-length` (reports, TensorBoard, other text, bad
input), the periodic evaluation during training, and the memory bound at 16k tokens."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from lmtrain.config import load_config
from tests.helpers import DEBUG, ROOT, TINY_MODEL, run_cli

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
