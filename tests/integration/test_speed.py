"""Training speed: `lmtrain bench train` against the peers (the same parameter count) and its
refusals, and a compiled training run (slow)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import CONFIGS, TINY_MODEL, run_cli

BENCH_MODEL = ["model.n_layers=1", "model.d_model=64", "model.n_heads=2", "model.d_ff=256", "model.bias=false",
               "data.seq_len=64", "data.batch_size=2"]


@pytest.mark.slow
def test_compiled_training_gives_the_losses_of_eager_training(tiny_data, tmp_path):
    """torch.compile (inductor) changes the kernels, not the model: the per-step losses and
    the final validation loss of 3 steps match eager training closely."""
    from lmtrain.train.callbacks.metrics_file import read_metrics

    for name, compiled in (("eager", "false"), ("compiled", "true")):
        run_cli("train", str(CONFIGS / "debug.yaml"), *tiny_data, *TINY_MODEL, f"trainer.compile={compiled}",
                "trainer.max_steps=3", "trainer.deterministic=false", f"run.root={tmp_path}", f"run.name={name}",
                check=True, timeout=1200)
    eager, compiled = (read_metrics(tmp_path / n / "metrics.jsonl") for n in ("eager", "compiled"))
    assert sorted(compiled) == sorted(eager) == [1, 2, 3]
    assert [compiled[s] for s in (1, 2, 3)] == pytest.approx([eager[s] for s in (1, 2, 3)], rel=1e-4)
    summaries = [json.loads((tmp_path / n / "summary.json").read_text()) for n in ("eager", "compiled")]
    assert summaries[1]["step"] == 3 and summaries[1]["val_loss"] == pytest.approx(summaries[0]["val_loss"], rel=1e-4)


# The `lmtrain bench` commands run under `make test-slow` (benchmarks, not the default suite's budget).
@pytest.mark.slow
def test_bench_train_against_peers_with_the_same_parameter_count(tiny_data, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("x_transformers")
    out = tmp_path / "bench.json"
    proc = run_cli("bench", "train", str(CONFIGS / "debug.yaml"), *tiny_data, *BENCH_MODEL, "--vs", "mpt,xtransformers",
                   "--variant", "model.position=none", "--steps", "2", "--warmup", "1", "--rounds", "1",
                   "--threads", "1", "--out", str(out), check=True)
    results = json.loads(out.read_text())["results"]
    assert [r["impl"] for r in results] == ["lmtrain", "lmtrain model.position=none", "mpt", "xtransformers"]
    assert len({r["params"] for r in results}) == 1  # the same model everywhere
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] and 0 <= r["data_wait"] < 1 for r in results)
    assert "the faster peer" in proc.stdout and "MFU against" in proc.stdout


def test_bench_train_refuses_what_a_peer_cannot_build(tiny_data):
    bad = run_cli("bench", "train", str(CONFIGS / "debug.yaml"), *tiny_data, "model.bias=true", "--vs", "mpt")
    assert bad.returncode == 2 and "model.bias=true" in bad.stderr
    bad = run_cli("bench", "train", str(CONFIGS / "debug.yaml"), "--vs", "gpt5")
    assert bad.returncode == 2 and "unknown peer" in bad.stderr
