"""ACT in training: through the CLI, exact resume, ponder scalars, the per-token histogram and
sample image, `lmtrain inspect` and `generate --show-token-stats`."""

from __future__ import annotations

import json

from tests.helpers import CONFIGS, run_cli


def test_train_resume_is_exact_and_logs_halting(tiny_data, tmp_path):
    """ACT trains through the CLI, resumes exactly, and logs ponder scalars, the per-token
    histogram and the sample image; `inspect` prints the distribution."""
    from lmtrain.train.callbacks.metrics_file import read_metrics

    args = [str(CONFIGS / "debug.yaml"), *tiny_data, "model.n_layers=1", "model.d_model=64",
            "model.n_heads=4", "model.d_ff=128", "model.depth.kind=act", "model.depth.max_steps=4",
            "data.seq_len=64", "data.batch_size=4", "trainer.max_steps=8", "trainer.val_every_n_steps=4",
            "trainer.log_every_n_steps=1", "checkpoint.every_n_steps=4", f"run.root={tmp_path}"]
    run_cli("train", *args, "run.name=full", check=True)
    run_cli("train", *args, "run.name=cut", "trainer.max_steps=4", check=True)
    run_cli("train", *args, "run.name=cut", check=True)
    full, cut = tmp_path / "full", tmp_path / "cut"
    want, got = read_metrics(full / "metrics.jsonl"), read_metrics(cut / "metrics.jsonl")
    assert [got[s] for s in range(5, 9)] == [want[s] for s in range(5, 9)]
    ponder = read_metrics(full / "metrics.jsonl", "stats/ponder/mean")
    assert sorted(ponder) == list(range(1, 9)) and all(1 <= v <= 5 for v in ponder.values())
    assert read_metrics(full / "metrics.jsonl", "train/ponder")
    hist = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines() if "act_steps/hist" in line]
    assert hist and sum(hist[-1]["act_steps/hist"].values()) == 4 * 64

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(full / "tb"),
                          size_guidance={"histograms": 0, "images": 0, "scalars": 0})
    ev.Reload()
    tags = ev.Tags()
    assert {"stats/ponder/mean", "stats/ponder/max", "train/ponder"} <= set(tags["scalars"])
    assert "act_steps/histogram" in tags["histograms"] and "act_steps/sample" in tags["images"]

    proc = run_cli("inspect", str(full), "--windows", "2", check=True)
    assert "depth        act" in proc.stdout and "act_steps per token, 2 validation windows" in proc.stdout
    assert "act_steps: mean" in proc.stdout and "highest mean act_steps" in proc.stdout
    proc = run_cli("generate", str(full), "--max-new-tokens", "5", "--show-token-stats", check=True)
    assert "act_steps per new token" in proc.stdout
