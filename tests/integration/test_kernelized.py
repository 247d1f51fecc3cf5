"""Kernelized attention in training: exact resume across a feature redraw, ALiBi refused by the
CLI, and `lmtrain bench attention`'s length sweep against softmax."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import CONFIGS, TINY_MODEL, run_cli, train_and_signal


def test_resume_is_exact_across_a_redraw(tiny_data, tmp_path):
    """Features redrawn every 4 steps; a run stopped by SIGUSR1 after step 5 and resumed gives
    the uninterrupted run's 16 losses bit for bit, and both end at draw 4."""
    from lmtrain.train.callbacks.metrics_file import read_metrics

    args = [str(CONFIGS / "debug.yaml"), *tiny_data, *TINY_MODEL, "model.attention.kind=performer",
            "model.position=rope", "model.attention.redraw_interval=4", "model.attention.features=32",
            "trainer.max_steps=16", "trainer.log_every_n_steps=1", "trainer.val_every_n_steps=8",
            "checkpoint.every_n_steps=100", f"run.root={tmp_path}"]
    run_cli("train", *args, "run.name=whole", check=True)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    code, out = train_and_signal([*args, "run.name=cut"], metrics, after_step=5)
    assert code == 0, out[-2000:]
    stopped_at = max(read_metrics(metrics))
    assert 4 <= stopped_at < 16, f"stopped at step {stopped_at}: not across a redraw"
    run_cli("train", *args, "run.name=cut", check=True)
    cut, whole = read_metrics(metrics), read_metrics(tmp_path / "whole" / "metrics.jsonl")
    assert [cut[s] for s in range(1, 17)] == [whole[s] for s in range(1, 17)]
    for run in ("whole", "cut"):
        ckpt = torch.load(tmp_path / run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        draws = {k: int(v) for k, v in ckpt["state_dict"].items() if k.endswith("features.draw")}
        assert draws and set(draws.values()) == {4}, draws


def test_cli_refuses_alibi_with_exit_code_2(tmp_path):
    proc = run_cli("train", str(CONFIGS / "debug.yaml"), "model.attention.kind=performer", "model.position=alibi",
                   f"run.root={tmp_path}")
    assert proc.returncode == 2
    assert "never forms the query-key scores" in proc.stderr
    assert not any(tmp_path.iterdir())


# The `lmtrain bench` commands run under `make test-slow` (benchmarks, not the default suite's budget).
@pytest.mark.slow
def test_bench_attention_sweeps_lengths_against_softmax(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli("bench", "attention", "--kind", "performer", "--lengths", "128,256", "--features", "32",
                   "--heads", "2", "--head-dim", "16", "--rounds", "1", "--repeats", "1", "--threads", "1",
                   "--out", str(out), check=True)
    assert "| 128 |" in proc.stdout and "| 256 |" in proc.stdout and "crossover:" in proc.stdout
    results = json.loads(out.read_text())["results"]
    assert sorted((r["case"]["kind"], r["case"]["length"]) for r in results) == [
        ("performer", 128), ("performer", 256), ("softmax", 128), ("softmax", 256)]
    assert all(r["paths"].get("chunked") for r in results if r["case"]["kind"] == "performer")
    bad = run_cli("bench", "attention", "--kind", "performer", "--lengths", "1k")
    assert bad.returncode == 2 and "--lengths" in bad.stderr
