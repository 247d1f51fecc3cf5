"""Faults during checkpoint writes: kill -9 at random moments of a save, and a disk that fills
mid-save. In both the run resumes from the newest complete checkpoint and ends with the
weights of an uninterrupted run, bit for bit."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmtrain.train.callbacks.metrics_file import read_metrics
from tests.helpers import DEBUG, ROOT, run_cli

# Checkpoints of about 40 MB, written at every step: each save takes long enough to be hit.
MODEL = ["model.n_layers=4", "model.d_model=256", "model.n_heads=4", "model.d_ff=1024", "model.dropout=0.1",
         "data.batch_size=2", "checkpoint.every_n_steps=1", "checkpoint.keep_last=2", "trainer.val_every_n_steps=100",
         "trainer.log_every_n_steps=1", "trainer.progress_bar=false"]


def args(tiny_data, root: Path, name: str, steps: int) -> list[str]:
    return ["train", DEBUG, *tiny_data, *MODEL, f"trainer.max_steps={steps}", f"run.root={root}", f"run.name={name}"]


def weights(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def assert_same_run(run: Path, reference: Path, steps: int) -> None:
    want, got = weights(reference), weights(run)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    a, b = read_metrics(reference / "metrics.jsonl"), read_metrics(run / "metrics.jsonl")
    assert [b[s] for s in range(1, steps + 1)] == [a[s] for s in range(1, steps + 1)]


def in_progress(ckpt_dir: Path) -> list[Path]:
    return list(ckpt_dir.glob(".*.tmp*")) if ckpt_dir.is_dir() else []


def wait(predicate, proc, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.0005)
    assert proc.poll() is None, "the run ended before a save could be hit"


def kill_during_saves(cmd: list[str], ckpt_dir: Path, kills: int, seed: int) -> int:
    """Start the run again and again, each time killing it (SIGKILL) at a random moment of a
    checkpoint save, `kills` times; each start first completes one save, so that the run moves
    on. Returns how many kills fell while a temporary checkpoint file was being written."""
    rng = random.Random(seed)
    mid_write = 0
    for _ in range(kills):
        proc = subprocess.Popen([sys.executable, "-m", "lmtrain", *cmd], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        wait(lambda: in_progress(ckpt_dir), proc)  # a save begins ...
        wait(lambda: not in_progress(ckpt_dir), proc)  # ... and ends (the step file; last.ckpt follows)
        wait(lambda: in_progress(ckpt_dir), proc)  # the next file
        time.sleep(rng.uniform(0.0, 0.03))
        writing = bool(in_progress(ckpt_dir))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        mid_write += writing
    return mid_write


def kill_trials(tiny_data, tmp_path, kills: int) -> None:
    steps = kills + 3
    reference = tmp_path / "whole"
    run_cli(*args(tiny_data, tmp_path, "whole", steps), check=True)
    cmd = args(tiny_data, tmp_path, "killed", steps)
    mid_write = kill_during_saves(cmd, tmp_path / "killed" / "checkpoints", kills, seed=kills)
    print(f"{kills} kills, {mid_write} of them while a checkpoint file was half-written")
    proc = run_cli(*cmd, check=True)
    assert "resuming from" in proc.stdout
    assert_same_run(tmp_path / "killed", reference, steps)
    assert mid_write >= 1


def test_kill_9_during_checkpoint_saves_resumes_exactly(tiny_data, tmp_path):
    kill_trials(tiny_data, tmp_path, kills=3)


@pytest.mark.slow
def test_kill_9_during_checkpoint_saves_20_times(tiny_data, tmp_path):
    kill_trials(tiny_data, tmp_path, kills=20)


@pytest.fixture
def small_disk(tmp_path):
    """A 200 MB tmpfs (root only; skipped with the reason elsewhere)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem (tmpfs) needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


def fill(filler: Path) -> None:
    """Take all the free space of filler's filesystem at once (fallocate, decreasing sizes:
    the save in progress is taking space too)."""
    fd = os.open(filler, os.O_CREAT | os.O_WRONLY)
    try:
        st = os.statvfs(filler.parent)
        size = st.f_bavail * st.f_frsize
        while size > 0:
            try:
                os.posix_fallocate(fd, 0, size)
                return
            except OSError:
                size -= 1 << 20
    finally:
        os.close(fd)


def test_a_disk_that_fills_mid_save(tiny_data, tmp_path, small_disk):
    """The disk fills while a checkpoint is being written: the run exits 2 with one line that
    says where, how much is free and needed; the previous checkpoint is intact; a rerun on the
    still-full disk fails the same way before training; once space is freed the run resumes
    from the newest complete checkpoint and ends with the uninterrupted run's weights."""
    steps = 8
    run_cli(*args(tiny_data, tmp_path, "whole", steps), check=True)
    cmd = args(tiny_data, small_disk, "r", steps)
    run_cli(*cmd[:-3], "trainer.max_steps=3", *cmd[-2:], check=True)  # steps 1-3 saved
    ckpt_dir = small_disk / "r" / "checkpoints"
    filler = small_disk / "filler"
    proc = subprocess.Popen([sys.executable, "-m", "lmtrain", *cmd], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while not in_progress(ckpt_dir) and proc.poll() is None:
        time.sleep(0.0005)
    fill(filler)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-2000:] + err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"lmtrain: error: {ckpt_dir}: the disk is full: ") and "needs about" in line, line
    assert not in_progress(ckpt_dir)  # the half-written file is gone
    from lmtrain.train.checkpoint import checkpoint_step

    assert checkpoint_step(ckpt_dir / "last.ckpt") >= 3  # the previous checkpoint is intact
    # Still full: the rerun fails at once, before any step.
    again = run_cli(*cmd)
    assert again.returncode == 2 and "the disk is full" in again.stderr.strip().splitlines()[-1]
    assert "step 1/" not in again.stdout
    filler.unlink()
    resumed = run_cli(*cmd, check=True)
    assert "resuming from" in resumed.stdout
    assert_same_run(small_disk / "r", tmp_path / "whole", steps)
