"""Checks before `lmtrain train` writes anything: the machine has what the config asks for,
the run dir can be written and is not the data dir, and the disk can hold a checkpoint.
Each failure is one line naming the key or path (exit 2)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from lmtrain.config import Config, ConfigError

# What a run dir holds, and a data dir never does.
RUN_DIR_MARKS = ("checkpoints", "metrics.jsonl", "summary.json", "tb")


class RunDirError(ValueError):
    """A run dir that cannot be used; the message names the key and the fix."""


def check_environment(cfg: Config) -> None:
    """The accelerator and precision the config asks for exist here."""
    import torch

    t = cfg.trainer
    if t.accelerator in ("gpu", "cuda"):
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available == 0:
            raise ConfigError(f"trainer.accelerator={t.accelerator}: no CUDA device on this machine; use "
                              "trainer.accelerator=cpu (or auto)")
        if isinstance(t.devices, int) and t.devices > available:
            raise ConfigError(f"trainer.devices={t.devices}: this machine has {available} CUDA device(s)")
    on_cpu = t.accelerator == "cpu" or (t.accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and t.precision == "16-mixed":
        raise ConfigError("trainer.precision=16-mixed needs a GPU; on the CPU use 32-true or bf16-mixed")


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable(path: Path, key: str) -> None:
    """`path` (or, if it does not exist yet, the directory it would be made in) can be written."""
    where = _existing(path.resolve())
    if not where.is_dir():
        raise RunDirError(f"{key}: {where} is a file, not a directory")
    if _read_only(where):
        raise RunDirError(f"{key}: {where} is on a read-only file system; choose a writable {key}")
    if not os.access(where, os.W_OK | os.X_OK):
        raise RunDirError(f"{key}: {where} is not writable (permission denied); choose a writable {key}")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in RUN_DIR_MARKS)


def check_run_dir(cfg: Config) -> None:
    """The run dir can be written, and it and the data dir are not the same place."""
    run_dir, data_dir = cfg.run_dir.resolve(), Path(cfg.data.dir).resolve()
    _writable(run_dir, "run.root" if not cfg.run_dir.exists() else "run.name")
    if run_dir == data_dir or data_dir in run_dir.parents:
        raise RunDirError(f"run.root: the run dir {run_dir} is inside data.dir {data_dir}; put runs elsewhere")
    if run_dir in data_dir.parents:
        raise RunDirError(f"data.dir: {data_dir} is inside the run dir {run_dir}; keep data outside runs")
    if is_run_dir(data_dir):
        mark = next(m for m in RUN_DIR_MARKS if (data_dir / m).exists())
        raise RunDirError(f"data.dir: {data_dir} is a run dir (it holds {mark}), not a prepared data dir; point "
                          "data.dir at the data (e.g. data/stdlib-bpe4096)")


def checkpoint_bytes(cfg: Config, resume_from: Optional[Path]) -> int:
    """What one checkpoint of this run takes: the size of the checkpoint it resumes from, else
    an estimate: fp32 weights and AdamW's two moments (12 bytes per parameter; ZeRO adds a
    master copy: 16)."""
    if resume_from is not None and resume_from.exists():
        if resume_from.is_file():
            return resume_from.stat().st_size
        return sum(f.stat().st_size for f in resume_from.rglob("*") if f.is_file())
    from lmtrain.plan import count_params

    per_param = 16 if cfg.trainer.strategy == "deepspeed" else 12
    return per_param * count_params(cfg)


def check_space_for_checkpoints(cfg: Config, resume_from: Optional[Path]) -> None:
    """A run that cannot save a checkpoint fails before its first step, not at its first save."""
    from lmtrain.train.checkpoint_io import check_space

    ckpt_dir = cfg.run_dir / "checkpoints"
    newest = resume_from.name if resume_from is not None and resume_from.parent == ckpt_dir else ""
    check_space(ckpt_dir, checkpoint_bytes(cfg, resume_from), newest)
