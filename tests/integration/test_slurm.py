"""The SLURM round trip on a real local cluster (slurm/local/start.sh: slurmctld and two
slurmd "nodes" on this machine): `lmtrain submit` renders and submits the real template for
a 2-task CPU DDP job across the two nodes; the test sends USR1 mid-run and checks the save,
the requeue, the resume, the final step count, and that the final weights equal those of an
uninterrupted job. Skipped (with the reason) where no local cluster can be started: not
root, or no Debian packages."""

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


def test_preempted_job_is_requeued_and_resumes_exactly(cluster, tiny_data, tmp_path):
    args = [str(CONFIGS / "debug.yaml"), *tiny_data, *TINY_MODEL, "model.dropout=0.1", "trainer.max_steps=40",
            "checkpoint.every_n_steps=20", "trainer.num_nodes=2", "trainer.devices=1", "trainer.strategy=ddp",
            "slurm.cpus_per_task=1", "slurm.time=20", f"run.root={tmp_path / 'runs'}"]

    def submit(name: str) -> str:
        proc = run_cli("submit", *args, f"run.name={name}", env_extra=cluster, check=True)
        return re.search(r"submitted (\d+)", proc.stdout).group(1)

    plain, preempted = submit("plain"), submit("preempted")
    run = tmp_path / "runs" / "preempted"
    metrics = run / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and max(read_metrics(metrics), default=0) >= 5, 600, "step 5 of the job")
    assert job_state(cluster, preempted) == "RUNNING"
    subprocess.run(["scancel", "--signal=USR1", preempted], check=True, env={**os.environ, **cluster})

    # Requeued jobs wait ~2 minutes before they may start again; as the admin, let it start now.
    wait_for(lambda: job_state(cluster, preempted) in ("PENDING", "REQUEUED", "REQUEUE_HOLD"), 300, "the requeue")
    wait_for(lambda: job_state(cluster, preempted) != "REQUEUED", 60, "the requeued job to be pending")
    scontrol(cluster, "update", f"JobId={preempted}", "StartTime=now")
    for job in (preempted, plain):
        wait_for(lambda j=job: job_state(cluster, j) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 900,
                 f"job {job} to finish")
    out = "".join(p.read_text() for p in sorted((run / "slurm").glob("*.out")))
    err = "".join(p.read_text() for p in sorted((run / "slurm").glob("*.err")))
    assert job_state(cluster, preempted) == "COMPLETED", out[-3000:] + err[-3000:]
    assert job_state(cluster, plain) == "COMPLETED"

    assert "restart 0" in out and "restart 1" in out, out[-3000:]
    assert "preemption: signal received" in out and "requeued" in out, out[-3000:]
    assert "resuming from" in out
    from lmtrain.train.checkpoint import checkpoint_step

    assert checkpoint_step(run / "checkpoints" / "last.ckpt") == 40
    want = torch.load(tmp_path / "runs" / "plain" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    got = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    for key, value in want["state_dict"].items():
        assert torch.equal(value, got["state_dict"][key]), key
    lw, lg = read_metrics(tmp_path / "runs" / "plain" / "metrics.jsonl"), read_metrics(metrics)
    assert [lg[s] for s in range(1, 41)] == [lw[s] for s in range(1, 41)]
