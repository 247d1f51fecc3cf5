"""Writing checkpoints: atomic files and directories, and a full disk.

A file is written to a temporary name in the same directory, fsynced, then renamed over the
old one; a DeepSpeed directory is written beside the old one and swapped in (`swap_in`). A
kill at any moment leaves the old checkpoint or the new one, never a torn one, and
`clean_partial` tidies what a kill left behind.

Before a save, the free space of the checkpoint's filesystem is compared with what the save
needs (the tensors it holds); a save that cannot fit, or a write that fails with ENOSPC or
EDQUOT anyway, raises `DiskFull` with one line: where, how much is free, how much the save
needs, and that the previous checkpoint is intact. The temporary file is removed.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lmtrain.train.checkpoint import CheckpointError, safe_load

FULL = (errno.ENOSPC, errno.EDQUOT)
MARGIN = 1.05  # zip headers and pickled metadata on top of the tensors


class DiskFull(CheckpointError):
    """A checkpoint does not fit on its filesystem."""


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) checkpoint dict, each storage counted once."""
    seen, total, stack = set(), 0, [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            key = (x.untyped_storage().data_ptr(), x.device)
            if key not in seen:
                seen.add(key)
                total += x.untyped_storage().nbytes()
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return total


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def free_bytes(directory: Path) -> int:
    """Free bytes for this user on the filesystem that holds `directory` (or its nearest
    existing parent)."""
    d = Path(directory)
    while not d.exists() and d != d.parent:
        d = d.parent
    st = os.statvfs(d)
    return st.f_bavail * st.f_frsize


def disk_full(directory: Path, need: int, previous: str = "") -> DiskFull:
    kept = f"; {previous} is intact" if previous else ""
    return DiskFull(f"{directory}: the disk is full: {human(free_bytes(directory))} free, this checkpoint needs about "
                    f"{human(need)}{kept}; free space there, then run the same command to resume")


def check_space(directory: Path, need: int, previous: str = "") -> None:
    """Raise DiskFull unless `need` bytes (with a margin) fit in `directory`."""
    if free_bytes(directory) < need * MARGIN:
        raise disk_full(directory, int(need * MARGIN), previous)


def _previous(path: Path) -> str:
    return path.name if path.exists() else ""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Atomic, space-checked saves (see the module docstring); loads through `safe_load`."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        if get_filesystem(path).protocol not in ("file", ("file", "local")):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path.parent.mkdir(parents=True, exist_ok=True)
        need = tensor_bytes(checkpoint)
        check_space(path.parent, need, _previous(path))
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        f = None
        try:
            with _open_tmp(tmp) as raw:
                f = _Recording(raw)
                torch.save(checkpoint, f)
                raw.flush()
                os.fsync(raw.fileno())
        except (OSError, RuntimeError) as e:
            tmp.unlink(missing_ok=True)
            # torch's zip writer swallows the OSError of a failed write and raises a bare
            # RuntimeError ("unexpected pos ..."); the error the file raised is the real one.
            cause = f.error if isinstance(e, RuntimeError) and f is not None and f.error is not None else e
            if isinstance(cause, OSError) and cause.errno in FULL:
                raise disk_full(path.parent, int(need * MARGIN), _previous(path)) from None
            if cause is not e:
                raise cause from None
            raise
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        """Every checkpoint is read by the weights-only unpickler, whatever the caller asks."""
        return safe_load(path, mmap=False)


def _open_tmp(tmp: Path):
    return open(tmp, "wb")


class _Recording:
    """The file torch.save writes to, remembering the OSError a write raised (torch reports
    only that the write fell short)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def swap_in(new: Path, final: Path) -> None:
    """Replace directory `final` by directory `new`. At every instant either `final` or its
    `.NAME.old` copy is complete; `clean_partial` repairs an interrupted swap."""
    for f in new.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    _fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def clean_partial(ckpt_dir: Path) -> None:
    """After a kill: drop half-written `.NAME.tmp*` files and directories; put back a
    `.NAME.old` directory whose swap did not finish (or drop it when it did)."""
    if not ckpt_dir.is_dir():
        return
    for p in ckpt_dir.glob(".*.tmp*"):
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    for old in ckpt_dir.glob(".*.old"):
        final = old.with_name(old.name[1 : -len(".old")])
        if final.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, final)
