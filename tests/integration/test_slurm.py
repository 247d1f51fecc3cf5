"""The SLURM round trip on a real local cluster (slurm/local/start.sh: slurmctld and two
slurmd "nodes" on this machine): `lmtrain submit --sweep` renders and submits the real
template as a job array of two 2-task CPU DDP jobs across the two nodes; the test sends USR1
to one task mid-run and checks the save, the requeue of that task alone, the resume, the
final step count, and that its final weights equal those of the uninterrupted task.
Skipped (with the reason) where no local cluster can be started: not root, or no Debian
packages."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from lmtrain.train.callbacks.metrics_file import read_metrics
from tests.helpers import CONFIGS, ROOT, TINY_MODEL, run_cli

START, STOP = ROOT / "slurm" / "local" / "start.sh", ROOT / "slurm" / "local" / "stop.sh"


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (its daemons run as root)")
    if not Path("/usr/bin/apt-get").exists() and not Path("/usr/sbin/slurmctld").exists():
        pytest.skip("no SLURM and no apt-get to install it: cannot start a local cluster here")
    state = Path(f"/tmp/lmtrain-slurm-test-{os.getpid()}")
    proc = subprocess.run(["bash", str(START), str(state)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        subprocess.run(["bash", str(STOP), str(state)], capture_output=True)
        pytest.fail(f"slurm/local/start.sh failed:\n{proc.stdout}\n{proc.stderr}")
    env = {"SLURM_CONF": str(state / "slurm.conf")}
    yield env
    subprocess.run(["bash", str(STOP), str(state)], capture_output=True, timeout=120)


def scontrol(env, *args) -> str:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, env={**os.environ, **env}).stdout


def job_state(env, job: str) -> str:
    m = re.search(r"JobState=(\w+)", scontrol(env, "show", "job", job))
    return m.group(1) if m else "UNKNOWN"


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.mark.slow  # two training jobs under the local cluster: `make test-slow`
def test_a_sweep_runs_as_one_array_and_a_preempted_task_resumes_alone(cluster, tiny_data, tmp_path):
    """`lmtrain submit --sweep` with two values: one job array, a run dir per task. USR1 to
    task 1 saves, requeues and resumes that task alone (task 0 never restarts); both finish,
    and the preempted task ends with the weights and losses of the uninterrupted one (the
    swept key, checkpoint.keep_last, does not change training)."""
    args = [str(CONFIGS / "debug.yaml"), *tiny_data, *TINY_MODEL, "model.dropout=0.1", "trainer.max_steps=40",
            "checkpoint.every_n_steps=20", "trainer.num_nodes=2", "trainer.devices=1", "trainer.strategy=ddp",
            "slurm.cpus_per_task=1", "slurm.time=20", f"run.root={tmp_path / 'runs'}", "run.name=s"]
    proc = run_cli("submit", *args, "--sweep", "checkpoint.keep_last=2,3", env_extra=cluster, check=True)
    array = re.search(r"submitted (\d+): a job array of 2 tasks", proc.stdout).group(1)
    plain, preempted = f"{array}_0", f"{array}_1"
    run = tmp_path / "runs" / "s-1"
    metrics = run / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and max(read_metrics(metrics), default=0) >= 5, 600, "step 5 of task 1")
    assert job_state(cluster, preempted) == "RUNNING"
    subprocess.run(["scancel", "--signal=USR1", preempted], check=True, env={**os.environ, **cluster})

    # Requeued jobs wait ~2 minutes before they may start again; as the admin, let it start now.
    wait_for(lambda: job_state(cluster, preempted) in ("PENDING", "REQUEUED", "REQUEUE_HOLD"), 300, "the requeue")
    wait_for(lambda: job_state(cluster, preempted) != "REQUEUED", 60, "the requeued task to be pending")
    scontrol(cluster, "update", f"JobId={preempted}", "StartTime=now")
    for job in (preempted, plain):
        wait_for(lambda j=job: job_state(cluster, j) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 900,
                 f"task {job} to finish")
    logs = tmp_path / "runs" / "s-sweep"
    out1 = "".join(p.read_text() for p in sorted(logs.glob(f"*-{array}_1.out")))
    err1 = "".join(p.read_text() for p in sorted(logs.glob(f"*-{array}_1.err")))
    out0 = "".join(p.read_text() for p in sorted(logs.glob(f"*-{array}_0.out")))
    assert job_state(cluster, preempted) == "COMPLETED", out1[-3000:] + err1[-3000:]
    assert job_state(cluster, plain) == "COMPLETED"

    assert "restart 0" in out1 and "restart 1" in out1, out1[-3000:]
    assert "preemption: signal received" in out1 and "requeued" in out1 and "resuming from" in out1
    assert "restart 1" not in out0 and "preemption" not in out0  # the other task ran once, untouched
    from lmtrain.train.checkpoint import checkpoint_step

    assert checkpoint_step(run / "checkpoints" / "last.ckpt") == 40
    other = tmp_path / "runs" / "s-0"
    want = torch.load(other / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    got = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    for key, value in want["state_dict"].items():
        assert torch.equal(value, got["state_dict"][key]), key
    lw, lg = read_metrics(other / "metrics.jsonl"), read_metrics(metrics)
    assert [lg[s] for s in range(1, 41)] == [lw[s] for s in range(1, 41)]
