"""Reversible layers in training: 100 steps equal to plain autograd, exact resume after a
signal; and `lmtrain bench memory`."""

from __future__ import annotations

import json

import pytest

from tests.helpers import CONFIGS, run_cli, train_and_signal


@pytest.mark.slow  # 100 steps of two models: `make test-slow`; the unit tests compare gradients per step
def test_100_steps_equal_plain_autograd_with_a_resume(tiny_data, tmp_path):
    """Per-step training losses of the reversible model equal those of the two-stream model
    under plain autograd (relative 1e-5); a reversible run stopped mid-way and resumed gives
    the uninterrupted run's losses exactly.

    In float64. In float32 the rebuilt inputs differ from the kept ones in the last bits
    (about 2e-7 relative), and Adam turns last-bit differences of near-zero gradients into
    full-size updates, so two float32 runs that differ in summation order part after a few
    steps whatever the wiring (here after 7 steps at 1e-5)."""
    from lmtrain.train.callbacks.metrics_file import read_metrics

    args = [str(CONFIGS / "debug.yaml"), *tiny_data, "model.n_layers=4", "model.d_model=64", "model.n_heads=4",
            "model.d_ff=128", "model.dropout=0.1", "trainer.precision=64-true", "data.seq_len=64", "data.batch_size=4",
            "trainer.max_steps=100",
            "trainer.val_every_n_steps=50", "trainer.log_every_n_steps=1", "checkpoint.every_n_steps=10",
            f"run.root={tmp_path}"]
    run_cli("train", *args, "model.residual=two_stream", "run.name=plain", check=True)
    run_cli("train", *args, "model.residual=reversible", "run.name=rev", check=True)
    plain, rev = read_metrics(tmp_path / "plain" / "metrics.jsonl"), read_metrics(tmp_path / "rev" / "metrics.jsonl")
    assert sorted(plain) == sorted(rev) == list(range(1, 101))
    worst = max(abs(rev[s] - plain[s]) / abs(plain[s]) for s in plain)
    print(f"largest relative difference of the per-step losses over 100 steps: {worst:.2e}")
    assert worst <= 1e-5
    # Stopped by SIGUSR1 mid-run and resumed: the same losses as the uninterrupted run, bit for
    # bit (in float32, the training default).
    f32 = [*args, "model.residual=reversible", "trainer.precision=32-true"]
    run_cli("train", *f32, "run.name=rev32", check=True)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    code, out = train_and_signal([*f32, "run.name=cut"], metrics, after_step=20)
    assert code == 0, out[-2000:]
    assert max(read_metrics(metrics)) < 100, "the signal came too late to test a resume"
    run_cli("train", *f32, "run.name=cut", check=True)
    cut, whole = read_metrics(metrics), read_metrics(tmp_path / "rev32" / "metrics.jsonl")
    assert [cut[s] for s in range(1, 101)] == [whole[s] for s in range(1, 101)]
    assert plain[100] < plain[1] - 0.5  # it trains


# The `lmtrain bench` commands run under `make test-slow` (benchmarks, not the default suite's budget).
@pytest.mark.slow
def test_bench_memory_runs_each_case_in_its_own_process(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli("bench", "memory", "--layers", "1,3", "--length", "64", "--d-model", "32", "--repeats", "1",
                   "--residual", "two_stream,reversible", "--threads", "1", "--rounds", "1", "--out", str(out),
                   check=True)
    assert "| reversible |" in proc.stdout and "reversible step time vs two_stream" in proc.stdout
    results = json.loads(out.read_text())["results"]
    assert {(r["residual"], r["layers"]) for r in results} == {(w, n) for w in ("two_stream", "reversible")
                                                               for n in (1, 3)}
    assert all(r["activation_mb"] is not None and r["time_s"] > 0 for r in results)
    assert run_cli("bench", "memory", "--residual", "fancy").returncode == 2
