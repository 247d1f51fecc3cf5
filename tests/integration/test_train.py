"""Integration: prepare-data and train through the CLI, checkpoints, exact resume (also after
SIGKILL), DDP on 2 CPU processes, generation from a run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmtrain.train.callbacks.metrics_file import read_metrics
from tests.helpers import CONFIGS, ROOT, TINY_DATA, run_cli, train_and_signal

DEBUG = str(CONFIGS / "debug.yaml")
# Dropout on, so that exact resume also covers the RNG.
MODEL = ["model.n_layers=3", "model.d_model=128", "model.n_heads=4", "model.d_ff=256", "model.dropout=0.1"]
STEPS = ["trainer.max_steps=30", "checkpoint.every_n_steps=15", "trainer.val_every_n_steps=10",
         "trainer.log_every_n_steps=1"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def base_args(workdir) -> list[str]:
    data = [*TINY_DATA, f"data.dir={workdir / 'data'}"]
    proc = run_cli("prepare-data", DEBUG, *data, check=True)
    assert (workdir / "data" / "meta.json").is_file(), proc.stdout
    return [DEBUG, *data, *MODEL, *STEPS, f"run.root={workdir / 'runs'}"]


@pytest.fixture(scope="module")
def baseline_proc(workdir, base_args):
    """The uninterrupted 30-step run."""
    return run_cli("train", *base_args, "run.name=baseline", check=True)


@pytest.fixture(scope="module")
def baseline(workdir, baseline_proc) -> Path:
    return workdir / "runs" / "baseline"


def test_training_writes_checkpoints_logs_and_a_summary(baseline):
    losses = read_metrics(baseline / "metrics.jsonl")
    assert sorted(losses) == list(range(1, 31))
    first, last = [losses[s] for s in range(1, 6)], [losses[s] for s in range(26, 31)]
    assert sum(last) / 5 < sum(first) / 5 - 0.3, (first, last)
    ckpts = sorted(p.name for p in (baseline / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step000015.ckpt", "step000030.ckpt"]
    assert list((baseline / "tb").glob("events.out.tfevents.*"))
    from lmtrain.config import load_config

    saved = load_config(baseline / "config.yaml")
    assert saved.model.n_layers == 3 and saved.model.d_model == 128 and saved.trainer.max_steps == 30
    import json

    summary = json.loads((baseline / "summary.json").read_text())
    assert summary["step"] == 30 and summary["val_ppl"] < summary["unigram_val_ppl"]


def test_progress_and_summary_are_printed(baseline_proc):
    out = baseline_proc.stdout
    # Not a terminal: one plain progress line per logged step, then the summary.
    assert "step 1/30 | loss" in out and "step 30/30 | loss" in out and "tok/s" in out and "eta" in out
    for words in ("validation perplexity", "unigram perplexity", "last.ckpt", "tensorboard --logdir"):
        assert words in out, words


def test_tensorboard_has_the_promised_scalars(baseline):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(baseline / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/ppl", "val/loss", "val/ppl", "lr", "hp/val_loss", "perf/tokens_per_s",
                "perf/mfu", "perf/peak_tflops", "train/grad_norm"):
        assert tag in tags, (tag, sorted(tags))


def test_resume_from_step_15_is_exact(workdir, base_args, baseline):
    run = workdir / "runs" / "resumed"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(baseline / "checkpoints" / "step000015.ckpt", run / "checkpoints" / "step000015.ckpt")
    proc = run_cli("train", *base_args, "run.name=resumed", "--resume", str(run / "checkpoints" / "step000015.ckpt"),
                   check=True)
    assert "resuming from" in proc.stdout
    want, got = read_metrics(baseline / "metrics.jsonl"), read_metrics(run / "metrics.jsonl")
    assert sorted(got) == list(range(16, 31))
    assert [got[s] for s in range(16, 31)] == [want[s] for s in range(16, 31)]  # exact, not approximate
    want_lr, got_lr = read_metrics(baseline / "metrics.jsonl", "lr"), read_metrics(run / "metrics.jsonl", "lr")
    assert [got_lr[s] for s in range(16, 31)] == [want_lr[s] for s in range(16, 31)]
    # Validation runs at the same global steps, with the same results.
    want_val = read_metrics(baseline / "metrics.jsonl", "val/loss")
    got_val = read_metrics(run / "metrics.jsonl", "val/loss")
    assert sorted(want_val) == [10, 20, 30] and sorted(got_val) == [20, 30]
    assert [got_val[s] for s in (20, 30)] == [want_val[s] for s in (20, 30)]


def test_resume_after_sigkill_is_exact(workdir, base_args, baseline):
    """Kill -9 right after the step-15 checkpoint, then `lmtrain train` again resumes by itself."""
    run = workdir / "runs" / "killed"
    cmd = [sys.executable, "-m", "lmtrain", "train", *base_args, "run.name=killed"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    ckpt = run / "checkpoints" / "step000015.ckpt"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (run / "checkpoints" / "step000030.ckpt").exists(), "killed too late to test a mid-run kill"

    resumed = run_cli("train", *base_args, "run.name=killed", check=True)
    assert "resuming from" in resumed.stdout
    want, got = read_metrics(baseline / "metrics.jsonl"), read_metrics(run / "metrics.jsonl")
    assert [got[s] for s in range(16, 31)] == [want[s] for s in range(16, 31)]


def test_usr1_saves_at_the_step_stops_and_resumes_exactly(workdir, base_args, baseline):
    """SIGUSR1 (SLURM's warning before a time limit or preemption): the run finishes its step,
    saves last.ckpt there, exits 0; the same command resumes with the same losses."""
    from lmtrain.train.checkpoint import checkpoint_step

    run = workdir / "runs" / "usr1"
    metrics = run / "metrics.jsonl"
    returncode, out = train_and_signal([*base_args, "run.name=usr1"], metrics, after_step=5)
    assert returncode == 0, out[-3000:]
    assert "preemption: signal received" in out and "not a SLURM job" in out, out[-3000:]
    stopped = checkpoint_step(run / "checkpoints" / "last.ckpt")
    assert 5 <= stopped < 30, "the signal came too late to test a mid-run stop"
    assert not (run / "summary.json").exists()  # no final evaluation on the way out

    resumed = run_cli("train", *base_args, "run.name=usr1", check=True)
    assert "resuming from" in resumed.stdout
    want, got = read_metrics(baseline / "metrics.jsonl"), read_metrics(metrics)
    assert [got[s] for s in range(1, 31)] == [want[s] for s in range(1, 31)]


def test_resume_refuses_a_different_model(workdir, base_args, baseline):
    proc = run_cli("train", *base_args, "run.name=baseline", "model.n_layers=2")
    assert proc.returncode == 2
    assert "model.n_layers" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_no_resume_starts_fresh_and_keeps_the_old_files(workdir, base_args, baseline):
    run = workdir / "runs" / "fresh"
    shutil.copytree(baseline, run)
    proc = run_cli("train", *base_args, "run.name=fresh", "trainer.max_steps=4", "checkpoint.every_n_steps=1",
                   "checkpoint.keep_last=2", "--no-resume", check=True)
    assert "fresh start" in proc.stdout
    assert sorted(read_metrics(run / "metrics.jsonl")) == [1, 2, 3, 4]
    # keep_last=2 periodic checkpoints plus last; the old run's files are set aside, not lost.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step000003.ckpt",
                                                                       "step000004.ckpt"]
    (previous,) = (run / "previous").iterdir()
    assert (previous / "checkpoints" / "step000030.ckpt").is_file() and (previous / "metrics.jsonl").is_file()
    from lmtrain.train.checkpoint import checkpoint_step, last_checkpoint

    assert checkpoint_step(last_checkpoint(run)) == 4


def test_interrupted_directory_swap_is_repaired(tmp_path):
    """DeepSpeed checkpoints are directories, swapped in as a whole (lmtrain/train/strategy.py).
    A kill at any point of the swap leaves a complete checkpoint after clean_partial."""
    from lmtrain.train.checkpoint_io import clean_partial, swap_in

    ckpt = tmp_path / "checkpoints"
    def make(path, text):
        (path / "checkpoint").mkdir(parents=True)
        (path / "checkpoint" / "data").write_text(text)
        (path / "latest").write_text("checkpoint")

    make(ckpt / "last.ckpt", "old")
    make(ckpt / ".last.ckpt.tmp", "new")
    swap_in(ckpt / ".last.ckpt.tmp", ckpt / "last.ckpt")
    assert (ckpt / "last.ckpt" / "checkpoint" / "data").read_text() == "new"
    assert sorted(p.name for p in ckpt.iterdir()) == ["last.ckpt"]
    # Killed after the old copy moved aside, before the new one moved in: the old one returns.
    (ckpt / "last.ckpt").rename(ckpt / ".last.ckpt.old")
    make(ckpt / ".last.ckpt.tmp", "half-written")
    clean_partial(ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == ["last.ckpt"]
    assert (ckpt / "last.ckpt" / "checkpoint" / "data").read_text() == "new"
    # Killed after the new one moved in, before the old one was deleted: the old one goes.
    make(ckpt / ".last.ckpt.old", "old")
    clean_partial(ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == ["last.ckpt"]


def test_generate_from_a_run(baseline):
    proc = run_cli("generate", str(baseline), "--prompt", "def ", "--max-new-tokens", "16", "--temperature", "0",
                   check=True)
    assert proc.stdout.startswith("def ") and len(proc.stdout) > 6
    again = run_cli("generate", str(baseline / "checkpoints" / "last.ckpt"), "--prompt", "def ",
                    "--max-new-tokens", "16", "--temperature", "0", "--no-cache", check=True)
    assert again.stdout == proc.stdout  # the KV cache changes nothing


def test_generate_missing_checkpoint_exits_2(tmp_path):
    proc = run_cli("generate", str(tmp_path / "nothing"))
    assert proc.returncode == 2 and "no checkpoint" in proc.stderr


def test_ddp_two_cpu_processes_match_single_process(workdir, base_args):
    """Same global batch (1 x 8 vs 2 x 4): the same samples per step, so the same losses."""
    common = [*base_args, "model.dropout=0.0", "trainer.max_steps=8", "trainer.val_every_n_steps=4",
              "checkpoint.every_n_steps=100"]
    run_cli("train", *common, "run.name=single", "data.batch_size=8", check=True)
    ddp = run_cli("train", *common, "run.name=ddp", "data.batch_size=4", "trainer.devices=2", "trainer.strategy=ddp",
                  check=True)
    single = read_metrics(workdir / "runs" / "single" / "metrics.jsonl")
    two = read_metrics(workdir / "runs" / "ddp" / "metrics.jsonl")
    assert sorted(two) == sorted(single) == list(range(1, 9)), ddp.stderr[-2000:]
    for s in single:
        assert two[s] == pytest.approx(single[s], rel=1e-4), s
    # checkpoint.every_n_steps=100 > max_steps: the final step is still saved, by every rank.
    from lmtrain.train.checkpoint import checkpoint_step

    for name in ("single", "ddp"):
        assert checkpoint_step(workdir / "runs" / name / "checkpoints" / "last.ckpt") == 8
    v1 = read_metrics(workdir / "runs" / "single" / "metrics.jsonl", "val/loss")
    v2 = read_metrics(workdir / "runs" / "ddp" / "metrics.jsonl", "val/loss")
    assert v2[8] == pytest.approx(v1[8], rel=1e-4)
