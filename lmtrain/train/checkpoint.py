"""Atomic checkpoint writes, and finding the checkpoint to resume from."""

from __future__ import annotations

import os
from dataclasses import dataclass
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


@dataclass
class Trained:
    """A model restored from a checkpoint, with where it came from."""

    cfg: object  # lmtrain.config.Config
    model: torch.nn.Module | None  # in eval mode
    checkpoint: Path
    step: int
    run_dir: Path  # the run dir holding the checkpoint (its parent for a loose file)


def load_trained(path: str | Path, device: str | torch.device = "cpu", *, with_model: bool = True) -> Trained:
    """A run directory (its newest checkpoint) or a checkpoint file -> Trained. With
    `with_model=False` only the config and the checkpoint's facts (model None): cheap,
    since the checkpoint is memory-mapped."""
    from lmtrain.model import build_model

    path = Path(path)
    if path.is_dir() and (path / EXPORT_WEIGHTS).is_file():
        return _load_export(path, device, with_model)
    ckpt_path = last_checkpoint(path) if path.is_dir() else path
    if ckpt_path is None or not ckpt_path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (expected a .ckpt file or a run dir with checkpoints/last.ckpt)")
    cfg, ckpt = load_config_from_checkpoint(ckpt_path)
    model = None
    if with_model:
        model = build_model(cfg, device=device)
        state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        model.load_state_dict(state)
        model.eval()
    run_dir = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
    return Trained(cfg=cfg, model=model, checkpoint=ckpt_path, step=int(ckpt.get("global_step", -1)), run_dir=run_dir)


# An export dir (`lmtrain export`): consolidated fp32 weights, the config, the tokenizer.
EXPORT_WEIGHTS, EXPORT_CONFIG, EXPORT_META = "model.safetensors", "config.yaml", "export.json"


def _load_export(path: Path, device, with_model: bool) -> Trained:
    import json

    from safetensors.torch import load_model

    from lmtrain.config import load_config
    from lmtrain.model import build_model

    cfg = load_config(path / EXPORT_CONFIG)
    meta = json.loads((path / EXPORT_META).read_text()) if (path / EXPORT_META).is_file() else {}
    model = None
    if with_model:
        model = build_model(cfg, device=device)
        load_model(model, str(path / EXPORT_WEIGHTS), device=str(device))
        model.eval()
    return Trained(cfg=cfg, model=model, checkpoint=path / EXPORT_WEIGHTS, step=int(meta.get("step", -1)), run_dir=path)


def reload_with_model(trained: Trained, device="cpu") -> Trained:
    """The same checkpoint (or export) again, now with its model built and loaded."""
    src = trained.run_dir if trained.checkpoint.name == EXPORT_WEIGHTS else trained.checkpoint
    return load_trained(src, device)


def tokenizer_path(trained: Trained) -> Path:
    """The model's tokenizer: the copy in an export dir, else the one in its data.dir."""
    own = trained.run_dir / "tokenizer.json"
    return own if trained.checkpoint.name == EXPORT_WEIGHTS and own.is_file() else Path(trained.cfg.data.dir) / "tokenizer.json"
