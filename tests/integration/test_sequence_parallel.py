"""Integration: `lmtrain train` with trainer.sequence_parallel=2 on two gloo processes trains
exactly as one process over the same global batch (ALiBi and RoPE, with document masking),
under DDP and ZeRO-3, and a USR1 mid-run then a resume continues exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmtrain.train.callbacks.metrics_file import read_metrics
from tests.helpers import CONFIGS, TINY_DATA, run_cli, train_and_signal

DEBUG = str(CONFIGS / "debug.yaml")
STEPS = ["trainer.max_steps=20", "trainer.val_every_n_steps=10", "checkpoint.every_n_steps=10",
         "trainer.log_every_n_steps=1", "data.document_mask=true", "trainer.progress_bar=false"]
SP = ["trainer.devices=2", "trainer.sequence_parallel=2"]


@pytest.fixture(scope="module")
def base_args(tmp_path_factory) -> list[str]:
    work = tmp_path_factory.mktemp("sp")
    data = [*TINY_DATA, f"data.dir={work / 'data'}"]
    run_cli("prepare-data", DEBUG, *data, check=True)
    return [DEBUG, *data, *STEPS, f"run.root={work / 'runs'}"]


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


@pytest.mark.parametrize("position", ["alibi", "rope"])
def test_two_processes_train_as_one(trained, position):
    """Per-step losses of 20 steps, and the validation losses, within relative 1e-5."""
    one = trained(f"one-{position}", f"model.position.kind={position}")
    two = trained(f"sp-{position}", f"model.position.kind={position}", *SP, "trainer.strategy=ddp")
    assert_same_losses(one, two)
    # The checkpoints load as any other (no shard), with the same weights.
    import torch

    from lmtrain.train.checkpoint import load_trained

    a, b = load_trained(one), load_trained(two)
    assert a.model.sequence_shard is None and b.model.sequence_shard is None
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_zero3_with_sequence_parallelism(trained):
    zero3 = trained("sp-zero3", *SP, "trainer.strategy=deepspeed", "deepspeed.zero_stage=3")
    assert_same_losses(trained("one-alibi", "model.position.kind=alibi"), zero3)


def test_usr1_then_resume_continues_exactly(base_args, trained):
    """Stopped by USR1 after step 6 (a checkpoint at the step it stops), resumed to step 20:
    the same losses as the uninterrupted sequence-parallel run."""
    args = [*base_args, *SP, "trainer.strategy=ddp", "run.name=sp-cut"]
    cut = runs(base_args) / "sp-cut"
    code, out = train_and_signal(args, cut / "metrics.jsonl", after_step=6)
    assert code == 0 and "stopped at step" in out, out[-3000:]
    stopped = max(read_metrics(cut / "metrics.jsonl"))
    assert 6 <= stopped < 20
    run_cli("train", *args, check=True)
    assert_same_losses(trained("sp-alibi", "model.position.kind=alibi", *SP, "trainer.strategy=ddp"), cut)


@pytest.mark.slow
def test_two_groups_of_two(trained):
    """Four processes: two sequence groups of two, data parallel across the groups."""
    both = trained("dp2-sp2", "trainer.devices=4", "trainer.sequence_parallel=2", "data.batch_size=4",
                   "trainer.strategy=ddp")
    assert_same_losses(trained("one-alibi", "model.position.kind=alibi"), both)
