"""Long contexts end to end: a length curriculum resumes bit-identically across a change of
length, and a run continues another at a longer length (context extension); bf16-mixed CPU
training (ALiBi folded in bf16) resumes exactly."""

from __future__ import annotations

import pytest

from lmtrain.train.callbacks.metrics_file import read_metrics
from tests.helpers import CONFIGS, TINY_MODEL, run_cli, train_twice_from_a_checkpoint

DEBUG = str(CONFIGS / "debug.yaml")


def test_length_curriculum_resumes_bit_identically_across_a_change(tiny_data, tmp_path):
    """32 tokens (micro-batch 16) for 5 steps, then 64 (micro-batch 8); run b resumes from the
    step-4 checkpoint, before the change, and logs exactly run a's losses after it."""
    args = [DEBUG, *tiny_data, *TINY_MODEL, f"run.root={tmp_path}", "model.dropout=0.1", "data.seq_len=32,64@5",
            "trainer.max_steps=8", "checkpoint.every_n_steps=4", "trainer.val_every_n_steps=4",
            "trainer.log_every_n_steps=1"]
    run = train_twice_from_a_checkpoint(args, tmp_path, at=4, compare=(5, 6, 7, 8))
    lengths = read_metrics(run / "metrics.jsonl", "data/seq_len")
    assert lengths == {**{s: 32.0 for s in range(1, 6)}, **{s: 64.0 for s in range(6, 9)}}, lengths
    saved = (run / "config.yaml").read_text()
    assert "seq_len: 64" in saved and "length_schedule: 32@0,64@5" in saved


def _short_run_args(tiny_data, tmp_path) -> list[str]:
    return [DEBUG, *tiny_data, *TINY_MODEL, f"run.root={tmp_path}", "trainer.max_steps=4",
            "trainer.val_every_n_steps=4", "checkpoint.every_n_steps=4"]


def test_context_extension_continues_a_run_at_a_longer_length(tiny_data, tmp_path):
    """RoPE at 32 tokens, continued at 64 with position interpolation 2 (run.init_from); the
    length evaluation puts both in one table."""
    common = _short_run_args(tiny_data, tmp_path)
    run_cli("train", *common, "model.position.kind=rope", "data.seq_len=32", "run.name=short", check=True)
    out = run_cli("train", *common, "model.position.kind=rope", "model.position.interpolate=2", "data.seq_len=64",
                  f"run.init_from={tmp_path / 'short'}", "run.name=long", check=True).stdout
    assert "weights initialised from" in out
    report = run_cli("eval-length", str(tmp_path / "short"), str(tmp_path / "long"), "--lengths", "32,64",
                     "--max-tokens", "1024", "--no-tensorboard", check=True).stdout
    assert "| short | rope | 32 |" in report and "| long | rope (interpolate 2) | 64 |" in report, report


@pytest.mark.slow
def test_a_learned_position_table_is_not_extended(tiny_data, tmp_path):
    common = _short_run_args(tiny_data, tmp_path)
    run_cli("train", *common, "model.position.kind=learned", "data.seq_len=32", "run.name=learned", check=True)
    refused = run_cli("train", *common, "model.position.kind=learned", "data.seq_len=64",
                      f"run.init_from={tmp_path / 'learned'}", "run.name=learned-long")
    assert refused.returncode == 2 and "a learned position table has no rows for the new positions" in refused.stderr


def test_bf16_mixed_on_cpu_folds_alibi_and_resumes_exactly(tiny_data, tmp_path):
    """bf16-mixed training on the CPU (ALiBi folded in bf16, fp32 loss and optimizer state): a
    resume from the step-4 checkpoint logs exactly the uninterrupted run's losses."""
    args = [DEBUG, *tiny_data, *TINY_MODEL, f"run.root={tmp_path}", "model.dropout=0.1", "data.seq_len=512",
            "data.batch_size=1", "trainer.precision=bf16-mixed", "trainer.max_steps=6", "checkpoint.every_n_steps=3",
            "trainer.val_every_n_steps=3", "data.val_batches=1", "trainer.log_every_n_steps=1"]
    run = train_twice_from_a_checkpoint(args, tmp_path, at=3, compare=(4, 5, 6))
    losses = read_metrics(run / "metrics.jsonl")
    assert all(3.0 < v < 7.0 for v in losses.values()), losses
