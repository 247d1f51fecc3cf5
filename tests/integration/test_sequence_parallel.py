"""Integration: `lmtrain train` with trainer.sequence_parallel=2 on two gloo processes trains
exactly as one process over the same global batch (ALiBi and RoPE, with document masking),
also when stopped by USR1 mid-run and resumed, under DDP and ZeRO-3. The default suite runs
ALiBi (stopped and resumed); RoPE, ZeRO-3 and four processes run under `slow` (the unit tests
cover every position scheme and kind at the model level)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmtrain.train.callbacks.metrics_file import read_metrics
from tests.helpers import CONFIGS, run_cli, train_and_signal

DEBUG = str(CONFIGS / "debug.yaml")
STEPS = ["trainer.max_steps=20", "trainer.val_every_n_steps=10", "checkpoint.every_n_steps=10",
         "trainer.log_every_n_steps=1", "data.document_mask=true", "trainer.progress_bar=false"]
SP = ["trainer.devices=2", "trainer.sequence_parallel=2"]


@pytest.fixture(scope="module")
def base_args(tiny_data, tmp_path_factory) -> list[str]:
    return [DEBUG, *tiny_data, *STEPS, f"run.root={tmp_path_factory.mktemp('sp') / 'runs'}"]


def runs(args) -> Path:
    return Path(next(a for a in args if a.startswith("run.root=")).split("=", 1)[1])


@pytest.fixture(scope="module")
def trained(base_args):
    """trained(name, *overrides): the run dir of `lmtrain train` with them, trained once."""
    done: dict[str, Path] = {}

    def train(name: str, *overrides: str) -> Path:
        if name not in done:
            run_cli("train", *base_args, *overrides, f"run.name={name}", check=True)
            done[name] = runs(base_args) / name
        return done[name]

    return train


def assert_same_losses(a: Path, b: Path, steps: int = 20) -> None:
    for key in ("train/loss", "val/loss"):
        want, got = read_metrics(a / "metrics.jsonl", key), read_metrics(b / "metrics.jsonl", key)
        # A run stopped by a signal also validates where it stopped.
        assert set(want) <= set(got) and (key != "train/loss" or len(want) == len(got) == steps), (key, want, got)
        for s in want:
            assert got[s] == pytest.approx(want[s], rel=1e-5), (key, s, want[s], got[s])


def test_two_processes_stopped_and_resumed_train_as_one(base_args, trained):
    """ALiBi with documents: two processes, stopped by USR1 after step 6 (a checkpoint at the step
    they stop) and resumed to step 20, log one process's losses within relative 1e-5, and the
    checkpoints load as any other (no shard) and compute the same function."""
    import torch

    from lmtrain.train.checkpoint import load_trained

    one = trained("one-alibi", "model.position.kind=alibi")
    args = [*base_args, *SP, "trainer.strategy=ddp", "run.name=sp-cut"]
    cut = runs(base_args) / "sp-cut"
    code, out = train_and_signal(args, cut / "metrics.jsonl", after_step=6)
    assert code == 0 and "stopped at step" in out, out[-3000:]
    assert 6 <= max(read_metrics(cut / "metrics.jsonl")) < 20
    run_cli("train", *args, check=True)
    assert_same_losses(one, cut)
    # (Weights are not compared one by one: Adam turns noise-level gradient differences into
    # updates of either sign.)
    a, b = load_trained(one), load_trained(cut)
    assert a.model.sequence_shard is None and b.model.sequence_shard is None
    x = torch.randint(0, a.cfg.data.vocab_size, (2, a.cfg.data.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = (torch.nn.functional.cross_entropy(t.model(x).logits_BLV[:, :-1].flatten(0, 1), x[:, 1:].flatten())
                  for t in (a, b))
    assert float(lb) == pytest.approx(float(la), rel=1e-4)


@pytest.mark.slow
def test_rope_two_processes_train_as_one(trained):
    one = trained("one-rope", "model.position.kind=rope")
    assert_same_losses(one, trained("sp-rope", "model.position.kind=rope", *SP, "trainer.strategy=ddp"))


@pytest.mark.slow
def test_zero3_with_sequence_parallelism(trained):
    zero3 = trained("sp-zero3", *SP, "trainer.strategy=deepspeed", "deepspeed.zero_stage=3")
    assert_same_losses(trained("one-alibi", "model.position.kind=alibi"), zero3)


@pytest.mark.slow
def test_two_groups_of_two(trained):
    """Four processes: two sequence groups of two, data parallel across the groups."""
    both = trained("dp2-sp2", "trainer.devices=4", "trainer.sequence_parallel=2", "data.batch_size=4",
                   "trainer.strategy=ddp")
    assert_same_losses(trained("one-alibi", "model.position.kind=alibi"), both)
