"""Training speed: `lmtrain bench train` against the peers (the same parameter count) and its
refusals, and a compiled training run (slow)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import CONFIGS, TINY_MODEL, run_cli

BENCH_MODEL = ["model.n_layers=1", "model.d_model=64", "model.n_heads=2", "model.d_ff=256", "model.bias=false",
               "data.seq_len=64", "data.batch_size=2"]


@pytest.mark.slow
def test_compiled_training_runs(tiny_data, tmp_path):
    run_cli("train", str(CONFIGS / "debug.yaml"), *tiny_data, *TINY_MODEL, "trainer.compile=true",
            "trainer.max_steps=3", f"run.root={tmp_path}", "run.name=c", check=True, timeout=1200)
    assert (tmp_path / "c" / "summary.json").exists()


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
