"""Atomic checkpoint writes, finding the checkpoint to resume from, and reading checkpoints.

A checkpoint is either a Lightning file (`stepNNNNNN.ckpt`, `last.ckpt`) or, under
`trainer.strategy=deepspeed`, a DeepSpeed directory of the same name: `latest` names the
tag, `<tag>/` holds each rank's model and optimizer shards, and the model-states file of
rank 0 carries Lightning's own state (config, step, loops, our data position).
"""

from __future__ import annotations

import os
import shutil
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


def is_deepspeed_checkpoint(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "latest").is_file()


def _deepspeed_client_file(path: Path) -> Path:
    tag = (path / "latest").read_text().strip()
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (path / tag / name).is_file():
            return path / tag / name
    raise FileNotFoundError(f"{path}: a DeepSpeed checkpoint without the model states of rank 0 under {tag}/")


def read_checkpoint(path: str | Path) -> dict:
    """The Lightning state of a checkpoint file or DeepSpeed directory, memory-mapped (cheap):
    config, global step, loops, callbacks; for a file also the weights."""
    path = Path(path)
    file = _deepspeed_client_file(path) if is_deepspeed_checkpoint(path) else path
    return torch.load(file, map_location="cpu", weights_only=False, mmap=True)


def deepspeed_world_size(path: Path) -> int:
    """How many data-parallel ranks wrote a DeepSpeed checkpoint (one optimizer shard each)."""
    tag = (path / "latest").read_text().strip()
    return len(list((path / tag).glob("*optim_states.pt")))


def checkpoint_step(path: Path) -> int:
    return int(read_checkpoint(path).get("global_step", -1))


def _is_checkpoint(path: Path) -> bool:
    return path.is_file() or is_deepspeed_checkpoint(path)


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of a run: `last.ckpt`, unless a kill fell between the save of
    `stepNNNNNN.ckpt` and the save of `last.ckpt`, in which case the step file is newer."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    steps = sorted((p for p in ckpt_dir.glob("step*.ckpt") if _is_checkpoint(p)),
                   key=lambda p: int("".join(filter(str.isdigit, p.stem)) or -1))
    newest = steps[-1] if steps else None
    if not _is_checkpoint(last):
        return newest
    if newest is not None and int("".join(filter(str.isdigit, newest.stem))) > checkpoint_step(last):
        return newest
    return last


def load_config_from_checkpoint(path: str | Path):
    from lmtrain.config import from_dict

    ckpt = read_checkpoint(path)
    return from_dict(ckpt["hyper_parameters"]["config"]), ckpt


def model_state_dict(path: Path, ckpt: dict) -> dict:
    """The decoder's weights (fp32 for DeepSpeed: the optimizer's master copy), consolidated
    from every rank's shard when the checkpoint is a ZeRO directory."""
    if is_deepspeed_checkpoint(path):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=(path / "latest").read_text().strip())
        # The engine wraps the LightningModule: _forward_module.model.<decoder keys>
        state = {k.removeprefix("_forward_module."): v for k, v in state.items()}
    else:
        state = ckpt["state_dict"]
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


@dataclass
class Trained:
    """A model restored from a checkpoint, with where it came from."""

    cfg: object  # lmtrain.config.Config
    model: torch.nn.Module | None  # in eval mode
    checkpoint: Path
    step: int
    run_dir: Path  # the run dir holding the checkpoint (its parent for a loose file)


def load_trained(path: str | Path, device: str | torch.device = "cpu", *, with_model: bool = True) -> Trained:
    """A run directory (its newest checkpoint), a checkpoint file or DeepSpeed checkpoint
    directory, or an export directory -> Trained. With
    `with_model=False` only the config and the checkpoint's facts (model None): cheap,
    since the checkpoint is memory-mapped."""
    from lmtrain.model import build_model

    path = Path(path)
    if path.is_dir() and (path / EXPORT_WEIGHTS).is_file():
        return _load_export(path, device, with_model)
    ckpt_path = path if _is_checkpoint(path) else last_checkpoint(path) if path.is_dir() else path
    if ckpt_path is None or not _is_checkpoint(ckpt_path):
        raise FileNotFoundError(f"no checkpoint at {path} "
                                "(expected a .ckpt file or a run dir with checkpoints/last.ckpt)")
    cfg, ckpt = load_config_from_checkpoint(ckpt_path)
    model = None
    if with_model:
        model = build_model(cfg, device=device)
        model.load_state_dict(model_state_dict(ckpt_path, ckpt))
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
    if trained.checkpoint.name == EXPORT_WEIGHTS and own.is_file():
        return own
    return Path(trained.cfg.data.dir) / "tokenizer.json"
