"""Atomic checkpoint writes, and finding the checkpoint to resume from."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary file in the same directory, fsyncs, then renames.

    A kill at any moment leaves either the old file or the new one, never a torn one.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        if get_filesystem(path).protocol not in ("file", ("file", "local")):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def clean_partial(ckpt_dir: Path) -> None:
    """Remove temporary files left by a save that was killed."""
    if ckpt_dir.is_dir():
        for p in ckpt_dir.glob(".*.tmp*"):
            p.unlink(missing_ok=True)


def checkpoint_step(path: Path) -> int:
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return int(ckpt.get("global_step", -1))


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of a run: `last.ckpt`, unless a kill fell between the save of
    `stepNNNNNN.ckpt` and the save of `last.ckpt`, in which case the step file is newer."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    steps = sorted(ckpt_dir.glob("step*.ckpt"), key=lambda p: int("".join(filter(str.isdigit, p.stem)) or -1))
    newest = steps[-1] if steps else None
    if not last.is_file():
        return newest
    if newest is not None and int("".join(filter(str.isdigit, newest.stem))) > checkpoint_step(last):
        return newest
    return last


def load_config_from_checkpoint(path: str | Path):
    from lmtrain.config import from_dict

    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return from_dict(ckpt["hyper_parameters"]["config"]), ckpt
