"""Reading checkpoints safely, and choosing the newest intact one.

A checkpoint is either a Lightning file (`stepNNNNNN.ckpt`, `last.ckpt`) or, under
`trainer.strategy=deepspeed`, a DeepSpeed directory of the same name: `latest` names the
tag, `<tag>/` holds each rank's model and optimizer shards, and the model-states file of
rank 0 carries Lightning's own state (config, step, loops, our data position).

Every file is read with torch's weights-only unpickler (`safe_load`): it builds tensors and
plain containers, and from `SAFE_GLOBALS` the few DeepSpeed classes its optimizer shards
hold. A crafted pickle, which would run code when unpickled, is refused with one line
naming the file; so is a file that is truncated, overwritten or not a checkpoint. A
DeepSpeed directory is verified file by file before DeepSpeed itself reads it (DeepSpeed's
own loader unpickles without restriction; a file the restricted unpickler accepted holds
nothing else).

A run dir's checkpoint is the newest intact one (`newest_checkpoint`): `last.ckpt`, unless a
kill fell between the save of `stepNNNNNN.ckpt` and the save of `last.ckpt` (the step file is
newer), and never a damaged one: damaged candidates are skipped, and named.

Writing (atomic files and directories, a full disk) is lmtrain/train/checkpoint_io.py.
"""

from __future__ import annotations

import pickle
import re
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

# Classes DeepSpeed pickles into its checkpoints (optimizer shards of ZeRO 1/2/3, fp16/bf16).
SAFE_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                "deepspeed.runtime.zero.config.ZeroStageEnum",
                "deepspeed.utils.tensor_fragment.fragment_address")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (unsafe, damaged, not a checkpoint, or missing); the
    message is one line naming the file."""


def _safe_globals(names=SAFE_GLOBALS) -> list:
    """The allowed classes among `names`. DeepSpeed is imported only for a file that names
    its classes (importing it costs seconds and logs to stdout, which `generate` owns)."""
    import importlib

    found = []
    for name in names:
        module, _, attr = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # DeepSpeed absent (or another release): nothing to allow
            continue
    return found


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # the archive's pickle cannot even be scanned
        return ["unreadable objects"]


def _load(path: Path, mmap: bool) -> dict:
    """torch.load, weights only; the allow-listed DeepSpeed classes are admitted when the
    file names them and nothing else."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        unsafe = _unsafe_globals(path)
        if not unsafe or not set(unsafe) <= set(SAFE_GLOBALS):
            raise
    with torch.serialization.safe_globals(_safe_globals(unsafe)):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]


def safe_load(path: str | Path, *, mmap: bool = True) -> dict:
    """A checkpoint file's contents, read by the weights-only unpickler (see the module
    docstring). Raises CheckpointError for anything that is not a safe, intact checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: damaged or not a checkpoint (not a torch zip archive: truncated, "
                              "overwritten, or another format)")
    try:
        obj = _load(path, mmap)
    except pickle.UnpicklingError:
        unsafe = ", ".join([g for g in _unsafe_globals(path) if g not in SAFE_GLOBALS][:3] or ["unreadable objects"])
        raise CheckpointError(f"{path}: refused: it holds objects that unpickling would construct or run ({unsafe}); "
                              "lmtrain checkpoints hold tensors and plain values only") from None
    except Exception as e:  # zip members missing or cut short, storage errors
        raise CheckpointError(f"{path}: damaged ({_first_line(e)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not an lmtrain checkpoint (it holds a {type(obj).__name__})")
    return obj


def is_deepspeed_checkpoint(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "latest").is_file()


def _deepspeed_tag(path: Path) -> Path:
    try:
        tag = (path / "latest").read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}/latest: damaged ({_first_line(e)})") from None
    if not re.fullmatch(r"[\w.-]+", tag) or not (path / tag).is_dir():
        raise CheckpointError(f"{path}: damaged DeepSpeed checkpoint (`latest` names {tag!r}, which is not a "
                              "directory beside it)")
    return path / tag


def _deepspeed_client_file(path: Path) -> Path:
    tag = _deepspeed_tag(path)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (tag / name).is_file():
            return tag / name
    raise CheckpointError(f"{path}: damaged DeepSpeed checkpoint (no model states of rank 0 under {tag.name}/)")


def verify_deepspeed(path: Path) -> dict:
    """Rank 0's model-states file (Lightning's state) of a DeepSpeed checkpoint directory,
    after every file of the tag has passed `safe_load` and one optimizer shard per rank is
    there."""
    tag = _deepspeed_tag(path)
    client = safe_load(_deepspeed_client_file(path))
    for f in sorted(tag.glob("*.pt")):
        safe_load(f)
    ranks = client.get("dp_world_size")
    shards = len(list(tag.glob("*optim_states.pt")))
    if not isinstance(ranks, int) or shards != ranks:
        raise CheckpointError(f"{path}: damaged DeepSpeed checkpoint ({shards} optimizer shards under {tag.name}/, "
                              f"written by {ranks} ranks)")
    return client


def read_checkpoint(path: str | Path) -> dict:
    """The Lightning state of a checkpoint file or DeepSpeed directory (config, global step,
    loops, callbacks; for a file also the weights), read safely and memory-mapped (cheap),
    and checked to be an lmtrain checkpoint."""
    path = Path(path)
    if path.is_dir() and not is_deepspeed_checkpoint(path):
        raise CheckpointError(f"{path}: a directory, but not a DeepSpeed checkpoint (no `latest` file in it)")
    ckpt = verify_deepspeed(path) if is_deepspeed_checkpoint(path) else safe_load(path)
    config = ckpt.get("hyper_parameters", {}).get("config") if isinstance(ckpt.get("hyper_parameters"), dict) else None
    if not isinstance(config, dict) or not isinstance(ckpt.get("global_step"), int):
        raise CheckpointError(f"{path}: not an lmtrain checkpoint (no config and step in it)")
    if not is_deepspeed_checkpoint(path) and not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not an lmtrain checkpoint (no weights in it)")
    return ckpt


def deepspeed_world_size(path: Path) -> int:
    """How many data-parallel ranks wrote a DeepSpeed checkpoint (one optimizer shard each)."""
    return len(list(_deepspeed_tag(path).glob("*optim_states.pt")))


def checkpoint_step(path: Path) -> int:
    return int(read_checkpoint(path)["global_step"])


def _is_checkpoint(path: Path) -> bool:
    return path.is_file() or is_deepspeed_checkpoint(path)


def _named_step(path: Path) -> int:
    m = re.fullmatch(r"step(\d+)", path.stem)
    return int(m.group(1)) if m else -1


@dataclass
class Choice:
    """The newest intact checkpoint of a run dir (None if there is none), its step, and the
    newer candidates that were skipped because they are damaged, with the reasons."""

    path: Optional[Path] = None
    step: int = -1
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def notes(self) -> list[str]:
        return [f"{p.name} is unusable ({reason}); skipped" for p, reason in self.skipped]


def newest_checkpoint(run_dir: Path) -> Choice:
    """See the module docstring. Candidates are read newest first until one is intact."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    choice = Choice()
    last, last_step = ckpt_dir / "last.ckpt", -1
    if _is_checkpoint(last) or last.exists():
        try:
            last_step = checkpoint_step(last)
        except CheckpointError as e:
            choice.skipped.append((last, str(e).removeprefix(f"{last}: ")))
    steps = sorted((p for p in ckpt_dir.glob("step*.ckpt") if _named_step(p) >= 0), key=_named_step, reverse=True)
    for p in steps:
        if last_step >= 0 and _named_step(p) <= last_step:
            break  # last.ckpt is at least as new
        try:
            choice.path, choice.step = p, checkpoint_step(p)
            return choice
        except CheckpointError as e:
            choice.skipped.append((p, str(e).removeprefix(f"{p}: ")))
    if last_step >= 0:
        choice.path, choice.step = last, last_step
    return choice


def last_checkpoint(run_dir: Path, log: Optional[Callable[[str], None]] = None) -> Path | None:
    """The newest intact checkpoint of a run dir (`newest_checkpoint`); damaged candidates
    that were skipped are reported through `log`."""
    choice = newest_checkpoint(run_dir)
    if log is not None:
        for note in choice.notes():
            log(f"{Path(run_dir) / 'checkpoints'}/{note}")
        if choice.skipped and choice.path is not None:
            log(f"using {choice.path.name} (step {choice.step}), the newest intact checkpoint")
    return choice.path


def load_config_from_checkpoint(path: str | Path):
    from lmtrain.config import ConfigError, from_dict

    ckpt = read_checkpoint(path)
    try:
        return from_dict(ckpt["hyper_parameters"]["config"]), ckpt
    except ConfigError as e:
        raise CheckpointError(f"{path}: its config is not valid here ({e})") from None


def model_state_dict(path: Path, ckpt: dict) -> dict:
    """The decoder's weights (fp32 for DeepSpeed: the optimizer's master copy), consolidated
    from every rank's shard when the checkpoint is a ZeRO directory (whose files
    `read_checkpoint` has verified)."""
    if is_deepspeed_checkpoint(path):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=_deepspeed_tag(path).name)
        except Exception as e:  # shards that are safe but do not fit together
            raise CheckpointError(f"{path}: damaged DeepSpeed checkpoint ({_first_line(e)})") from None
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
    overrides: tuple[str, ...] = ()  # `model.*=value` changes applied to the saved config (evaluation)


def note(msg: str) -> None:
    print(f"lmtrain: note: {msg}", file=sys.stderr)


def load_trained(path: str | Path, device: str | torch.device = "cpu", *, with_model: bool = True,
                 log: Callable[[str], None] = note, overrides: Sequence[str] = ()) -> Trained:
    """A run directory (its newest intact checkpoint; a damaged newer one is skipped and named
    through `log`), a checkpoint file or DeepSpeed checkpoint directory, or an export
    directory -> Trained. With `with_model=False` only the config and the checkpoint's facts
    (model None): cheap, since the checkpoint is memory-mapped. `overrides` (`model.*=value`)
    change how the model computes before it is built (more LSH rounds at evaluation); changes
    that the weights do not fit are refused. Raises CheckpointError (ConfigError for a bad
    override)."""
    from lmtrain.model import build_model

    path = Path(path)
    if path.is_dir() and (path / EXPORT_WEIGHTS).is_file():
        return _load_export(path, device, with_model, tuple(overrides))
    if _is_checkpoint(path):
        ckpt_path = path
    elif path.is_dir():
        ckpt_path = last_checkpoint(path, log)
        if ckpt_path is None:
            raise CheckpointError(f"{path}: no intact checkpoint under {path / 'checkpoints'} (expected a run dir, "
                                  "a .ckpt file or an export dir)")
    else:
        raise CheckpointError(f"{path}: no checkpoint there (expected a .ckpt file, a run dir with "
                              "checkpoints/last.ckpt, or an export dir)")
    cfg, ckpt = load_config_from_checkpoint(ckpt_path)
    cfg = _overridden(cfg, overrides)
    model = None
    if with_model or overrides:
        state = model_state_dict(ckpt_path, ckpt)
        # Built on the meta device first (no memory, no init): a misfit is named before any work.
        problem = weights_misfit(build_model(cfg, device="meta").state_dict(), state)
        if problem:
            change = f" with {', '.join(overrides)}" if overrides else ""
            raise CheckpointError(f"{ckpt_path}: its weights do not fit its config{change} ({problem})")
    if with_model:
        model = build_model(cfg, device=device)
        model.load_state_dict(state)
        model.eval()
    run_dir = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
    return Trained(cfg=cfg, model=model, checkpoint=ckpt_path, step=int(ckpt.get("global_step", -1)), run_dir=run_dir,
                   overrides=tuple(overrides))


def weights_misfit(expected: dict, got: dict) -> str:
    """What keeps the weights `got` from loading into a model whose state dict is `expected`
    ("" if nothing): missing and unexpected names, and the first shape that differs."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    reshaped = [k for k in expected if k in got and tuple(expected[k].shape) != tuple(got[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing, such as {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, such as {unexpected[0]}")
    if reshaped:
        k = reshaped[0]
        parts.append(f"{k} is {tuple(got[k].shape)} there and {tuple(expected[k].shape)} here")
    return "; ".join(parts)


def _overridden(cfg, overrides: Sequence[str]):
    if not overrides:
        return cfg
    from lmtrain.config import with_overrides

    return with_overrides(cfg, overrides)


# An export dir (`lmtrain export`): consolidated fp32 weights, the config, the tokenizer.
EXPORT_WEIGHTS, EXPORT_CONFIG, EXPORT_META = "model.safetensors", "config.yaml", "export.json"
HF_EXPORT_CONFIG = "lmtrain.yaml"  # beside config.json in `--format hf` exports


def _load_export(path: Path, device, with_model: bool, overrides: tuple[str, ...] = ()) -> Trained:
    import json

    from safetensors.torch import load_model

    from lmtrain.config import load_config
    from lmtrain.model import build_model

    try:
        meta = json.loads((path / EXPORT_META).read_text()) if (path / EXPORT_META).is_file() else {}
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / EXPORT_META}: damaged ({_first_line(e)})") from None
    prefix = ""
    if meta.get("format_name") == "hf":  # `lmtrain export --format hf`
        if meta.get("hf_family") != "remote":
            raise CheckpointError(f"{path}: a Hugging Face export as {meta.get('hf_architecture')}; load it with "
                                  "transformers, or point lmtrain at the run (or an `lmtrain export` without --format)")
        cfg, prefix = load_config(path / HF_EXPORT_CONFIG), "model."
    else:
        cfg = load_config(path / EXPORT_CONFIG)
    cfg = _overridden(cfg, overrides)
    model = None
    if with_model or overrides:  # with overrides: loaded once here, so a misfit is named before any work
        model = build_model(cfg, device=device)
        try:
            if prefix:
                from safetensors.torch import load_file

                sd = load_file(str(path / EXPORT_WEIGHTS), device=str(device))
                model.load_state_dict({k[len(prefix):]: v for k, v in sd.items()})
            else:
                load_model(model, str(path / EXPORT_WEIGHTS), device=str(device))
        except Exception as e:  # a truncated or foreign safetensors file, or weights of another model
            raise CheckpointError(f"{path / EXPORT_WEIGHTS}: damaged or not this model's weights "
                                  f"({_first_line(e)})") from None
        model = model.eval() if with_model else None
    return Trained(cfg=cfg, model=model, checkpoint=path / EXPORT_WEIGHTS, step=int(meta.get("step", -1)), run_dir=path,
                   overrides=overrides)


def reload_with_model(trained: Trained, device="cpu") -> Trained:
    """The same checkpoint (or export) again, now with its model built and loaded."""
    src = trained.run_dir if trained.checkpoint.name == EXPORT_WEIGHTS else trained.checkpoint
    return load_trained(src, device, overrides=trained.overrides)


def tokenizer_path(trained: Trained) -> Path:
    """The model's tokenizer: the copy in an export dir, else the one in its data.dir."""
    own = trained.run_dir / "tokenizer.json"
    if trained.checkpoint.name == EXPORT_WEIGHTS and own.is_file():
        return own
    return Path(trained.cfg.data.dir) / "tokenizer.json"
