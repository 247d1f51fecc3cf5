"""Adaptive attention span in training: per-head statistics in TensorBoard and metrics.jsonl,
`lmtrain inspect`, exact resume; and `lmtrain bench attention` for spans side by side."""

from __future__ import annotations

import shutil

import pytest

from tests.helpers import CONFIGS, TINY_MODEL, run_cli


def test_training_logs_spans_per_head_inspect_prints_them_and_resume_is_exact(tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lmtrain.train.callbacks.metrics_file import read_metrics

    args = [str(CONFIGS / "debug.yaml"), *tiny_data, *TINY_MODEL, f"run.root={tmp_path}", "model.dropout=0.1",
            "model.attention.kind=adaptive_span", "model.attention.max_span=64", "model.attention.ramp=8",
            "model.attention.block=16", "model.attention.init_span=8", "model.attention.loss_coef=1e-3",
            "trainer.max_steps=12", "checkpoint.every_n_steps=6", "trainer.val_every_n_steps=6",
            "trainer.log_every_n_steps=2"]
    run_cli("train", *args, "run.name=a", check=True)
    run = tmp_path / "a"
    acc = EventAccumulator(str(run / "tb"), size_guidance={"histograms": 0, "images": 0, "scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"span/layer0/head0", "span/layer1/head3", "span/mean", "span/max", "train/span"} <= scalars, scalars
    assert {"span/layer0", "span/layer1"} <= set(acc.Tags()["histograms"])
    assert "span/heatmap" in acc.Tags()["images"]
    spans = read_metrics(run / "metrics.jsonl", "span/layer0")
    assert sorted(spans) == [2, 4, 6, 8, 10, 12]
    assert all(len(v) == 4 and all(0 <= z <= 64 for z in v) for v in spans.values())

    out = run_cli("inspect", str(run), check=True).stdout
    assert "span per layer and head (max 64)" in out and "| 1 |" in out and "head 3" in out and "% of 64" in out

    # Exact resume with this kind (z in the checkpoint, its optimizer state, the clamp).
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "checkpoints" / "step000006.ckpt", tmp_path / "b" / "checkpoints" / "step000006.ckpt")
    run_cli("train", *args, "run.name=b", check=True)
    want, got = read_metrics(run / "metrics.jsonl"), read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [got[s] for s in (8, 10, 12)] == [want[s] for s in (8, 10, 12)]
    assert read_metrics(tmp_path / "b" / "metrics.jsonl", "span/layer1")[12] == spans_at(run, 12)


def spans_at(run, step):
    from lmtrain.train.callbacks.metrics_file import read_metrics

    return read_metrics(run / "metrics.jsonl", "span/layer1")[step]


# The `lmtrain bench` commands run under `make test-slow` (benchmarks, not the default suite's budget).
@pytest.mark.slow
def test_bench_attention_compares_spans_side_by_side(tmp_path):
    import json

    out = tmp_path / "bench.json"
    proc = run_cli("bench", "attention", "--kind", "adaptive_span", "--length", "512", "--max-span", "256",
                   "--heads", "2", "--head-dim", "16", "--rounds", "1", "--repeats", "1", "--out", str(out), check=True)
    assert "| span S=256 | 320 |" in proc.stdout and "| span S/8=32 | 64 |" in proc.stdout, proc.stdout
    assert "softmax, all keys" in proc.stdout and "x faster" in proc.stdout
    results = json.loads(out.read_text())["results"]
    assert [r["label"] for r in results] == ["span S=256", "span S/8=32", "softmax, all keys"]
    assert all(r["time_s"] > 0 for r in results)
    assert set(results[0]["paths"]) == {"chunked"} and set(results[2]["paths"]) == {"sdpa"}
    bad = run_cli("bench", "attention", "--length", "1")
    assert bad.returncode == 2 and "--length" in bad.stderr
