"""Preemption and time limits: on SIGUSR1, finish the step, save, requeue, exit.

SLURM sends USR1 to the job's tasks `--signal=USR1@<seconds>` before the time limit (our
sbatch templates ask for it), and schedulers send it on preemption. The handler only sets
a flag; at the end of the current optimizer step the ranks agree on it (a max-reduce, so
a rank that got the signal a moment later still stops at the same step), every rank takes
part in saving `checkpoints/last.ckpt` (atomically), rank 0 asks SLURM to requeue the job
(`scontrol requeue $SLURM_JOB_ID`, when running under SLURM), and training stops. The
requeued job resumes from that checkpoint at the same step and data position.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import lightning.pytorch as pl
import torch

from lmtrain.train.loggers import log_scalars


class Preemption(pl.Callback):
    def __init__(self, ckpt_dir: Path, every: int = 1, sig: int = signal.SIGUSR1, log=print):
        """every: check for the signal every this many optimizer steps (with several ranks the
        check is a collective, so it rides on the steps that log metrics anyway)."""
        self.ckpt_dir, self.every, self.sig, self._log = Path(ckpt_dir), every, sig, log
        self.requested = False
        self.stopped_at: int | None = None
        self.requeued = False
        self._previous = None

    def _handler(self, signum, frame):
        self.requested = True

    def on_fit_start(self, trainer, pl_module):
        self._previous = signal.signal(self.sig, self._handler)

    def on_train_start(self, trainer, pl_module):  # after a resume has restored the step
        job = os.environ.get("SLURM_JOB_ID")
        if job and trainer.is_global_zero:
            restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
            self._log(f"slurm: job {job}, restart {restarts}, step {trainer.global_step}")
            log_scalars(trainer, {"slurm/restart_count": restarts}, trainer.global_step)

    def on_fit_end(self, trainer, pl_module):
        if self._previous is not None:
            signal.signal(self.sig, self._previous)

    def _agreed(self, trainer, device) -> bool:
        if trainer.world_size == 1:
            return self.requested
        flag = torch.tensor(float(self.requested), device=device)
        return bool(trainer.strategy.reduce(flag, reduce_op="max") > 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        if trainer.world_size > 1 and trainer.global_step % self.every and trainer.global_step != trainer.max_steps:
            return
        if not self._agreed(trainer, pl_module.device):
            return
        step = trainer.global_step
        path = self.ckpt_dir / "last.ckpt"
        trainer.save_checkpoint(path)
        self.stopped_at = step
        if trainer.is_global_zero:
            self._log(f"preemption: signal received; saved {path} at step {step}")
            self.requeued = requeue(self._log)
        trainer.should_stop = True


def requeue(log=print) -> bool:
    """Ask SLURM to requeue this job; False when not under SLURM or when it refuses."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        log("preemption: not a SLURM job; resume with the same command")
        return False
    # An array task is requeued by its own id.
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if proc.returncode != 0:
        log(f"preemption: scontrol requeue {job} failed: {(proc.stderr or proc.stdout).strip()}")
        return False
    log(f"preemption: job {job} requeued (restart {int(os.environ.get('SLURM_RESTART_COUNT', '0')) + 1} follows)")
    return True
