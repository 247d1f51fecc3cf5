"""`lmtrain export RUN_OR_CKPT --out DIR [--format lmtrain|hf]`: a self-contained model directory.

--format lmtrain (the default):

  model.safetensors   consolidated fp32 weights (tied weights stored once)
  config.yaml         the resolved training config
  tokenizer.json      the model's tokenizer (tokenizer_config.json: its special tokens)
  export.json         source checkpoint, step, parameter count, format version
  exit/               early exit: calibrated thresholds and the exit classifier (lmtrain/exits.py)

The source is a run dir, a Lightning checkpoint file, or a DeepSpeed checkpoint directory
of any ZeRO stage; ZeRO shards are consolidated into the fp32 master weights on the way
(one process, no GPU). `generate` and `eval-length` accept the directory in place of a run.

--format hf: a directory transformers, lm-evaluation-harness and vLLM load (lmtrain/hf/export.py):
a native architecture where the model is one exactly (MPT, GPT-NeoX, Llama), else remote code.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from lmtrain.config import to_yaml
from lmtrain.train.checkpoint import EXPORT_CONFIG, EXPORT_META, EXPORT_WEIGHTS, load_trained, tokenizer_path

FORMAT = 1
FORMATS = ("lmtrain", "hf")


def export(source: str | Path, out: str | Path, *, fmt: str = "lmtrain", max_length: int | None = None,
           log=print) -> Path:
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if max_length is not None and max_length < 1:
        raise ValueError(f"--max-length {max_length}: must be positive")
    t = load_trained(source, device="cpu")
    tok = tokenizer_path(t)
    if not tok.is_file():
        raise FileNotFoundError(f"the tokenizer of this model is missing: {tok} (its data.dir)")
    out = Path(out)
    if out.exists() and not (out / EXPORT_META).is_file():
        raise FileExistsError(f"--out {out}: exists and is not an lmtrain export; choose a new directory")
    if out.resolve() == t.run_dir.resolve():
        raise FileExistsError(f"--out {out}: that is the source itself; choose another directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    # A fresh directory of our own beside the target: an unrelated `X.partial` is never touched.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        if fmt == "hf":
            from lmtrain.hf.export import write_hf

            _write_meta(t, tmp, {"format_name": "hf", **write_hf(t, tok, tmp, max_length=max_length)})
        else:
            _write(t, tok, tmp)
            _write_meta(t, tmp, {})
        _copy_exit_calibration(t, tmp, log)
        make_readable(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():  # an earlier export: replaced
        shutil.rmtree(out)
    tmp.rename(out)  # the directory appears complete or not at all
    meta = json.loads((out / EXPORT_META).read_text())
    what = f" as {meta['hf_architecture']}" if fmt == "hf" else ""
    log(f"exported step {t.step} ({meta['parameters']:,} parameters) from {t.checkpoint} to {out}{what}")
    if fmt == "hf" and meta["hf_family"] == "remote":
        log("  no transformers architecture computes this model exactly; it loads with trust_remote_code=True "
            "where lmtrain is installed. Why not native: " + "; ".join(
                f"{name}: {', '.join(r)}" for name, r in meta["not_native"].items()))
    return out


def _write(t, tok: Path, tmp: Path) -> None:
    from safetensors.torch import save_model

    model = t.model.float()
    save_model(model, str(tmp / EXPORT_WEIGHTS), metadata={"format": f"lmtrain-export-{FORMAT}", "step": str(t.step)})
    (tmp / EXPORT_CONFIG).write_text(to_yaml(t.cfg))
    shutil.copyfile(tok, tmp / "tokenizer.json")
    if (tok.parent / "tokenizer_config.json").is_file():  # its special tokens (bos, pad), for an HF export later
        shutil.copyfile(tok.parent / "tokenizer_config.json", tmp / "tokenizer_config.json")


def _copy_exit_calibration(t, tmp: Path, log) -> None:
    """RUN/exit/ (early exit: calibrated thresholds, the exit classifier) when it belongs to the
    exported step; a calibration of another step is left out, with a note."""
    from lmtrain.exits import EXIT_DIR

    src = t.run_dir / EXIT_DIR
    if not src.is_dir() or src.resolve() == (tmp / EXIT_DIR).resolve():
        return
    steps = {f.name: json.loads(f.read_text()).get("step") for f in src.glob("*.json")}
    stale = [name for name, step in steps.items() if step != t.step]
    if stale:
        log(f"  not exported: {', '.join(sorted(stale))} in {src} (calibrated at another step than {t.step}; run "
            "`lmtrain calibrate-exit` again)")
    (tmp / EXIT_DIR).mkdir()
    for f in src.iterdir():
        if f.is_file() and f.name not in stale:
            shutil.copyfile(f, tmp / EXIT_DIR / f.name)


def _write_meta(t, tmp: Path, extra: dict) -> None:
    meta = {"format": FORMAT, "source": str(t.checkpoint), "step": t.step,
            "parameters": sum(p.numel() for p in t.model.parameters()), "dtype": str(torch.float32),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), **extra}
    (tmp / EXPORT_META).write_text(json.dumps(meta, indent=2) + "\n")


def make_readable(out: Path) -> None:
    """The export is shared: the directory 0755, its files 0644 (mkdtemp made it 0700)."""
    out.chmod(0o755)
    for p in out.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
