"""`lmtrain train`: data, resume, Lightning Trainer, and the end-of-run summary.

Run directory (run.root/run.name):
  config.yaml          the resolved config of the latest start
  checkpoints/         stepNNNNNN.ckpt (the last `checkpoint.keep_last`), last.ckpt
  tb/                  TensorBoard event files
  metrics.jsonl        logged scalars, one JSON object per line
  summary.json         final validation loss and perplexity, unigram baseline, paths
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from lmtrain.config import Config, flatten, to_dict, to_yaml

# Keys that may differ between the checkpoint's config and the config of a resume.
# What a continuation at a longer length may change beside data.seq_len (context extension):
# RoPE's base (base scaling) and position interpolation; neither has weights.
EXTENSION_KEYS = ("model.position.theta", "model.position.interpolate")
RESUMABLE_CHANGES = ("trainer.", "checkpoint.", "eval.", "slurm.", "run.root", "run.name", "run.init_from",
                     "data.num_workers", "data.num_proc", "data.val_batches")


class ResumeError(ValueError):
    """A checkpoint that cannot continue this config."""


class TrainingStopped(ValueError):
    """Training stopped before max_steps for a reason the user must act on (the non-finite
    guard); exit 2."""


def config_differences(a: dict, b: dict, allowed: tuple[str, ...] = ()) -> list[tuple[str, object, object]]:
    """(key, a's value, b's value) for every flattened key on which two config dicts differ,
    except keys starting with one of `allowed`."""
    fa, fb = flatten(a), flatten(b)
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb))
            if fa.get(k) != fb.get(k) and not (allowed and k.startswith(allowed))]


def check_resume_compatible(saved: Config, current: Config) -> None:
    for key, was, now in config_differences(to_dict(saved), to_dict(current), RESUMABLE_CHANGES):
        raise ResumeError(
                f"{key}: the checkpoint was trained with {was!r}, this config says {now!r}; "
                "resume with the same value, or start a new run (run.name=... or --no-resume)"
            )


def is_rank_zero() -> bool:
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "NODE_RANK"))


def wait_for_data(data_cfg, timeout_s: float = 3600.0) -> None:
    """Ranks other than 0 wait while rank 0 prepares the data (a shared filesystem is assumed),
    until the data dir matches their own inputs: a stale dir does not count."""
    from data_pipelines.prepare import is_prepared

    t0 = time.time()
    while not is_prepared(data_cfg):
        if time.time() - t0 > timeout_s:
            raise TimeoutError(f"waited {timeout_s:.0f} s for rank 0 to prepare {data_cfg.dir}")
        time.sleep(2.0)


def resolve_resume(cfg: Config, resume: Optional[str], no_resume: bool, log=print) -> Optional[Path]:
    """The checkpoint to resume from: `--resume`'s file, or the newest intact checkpoint of
    `--resume`'s run dir or of this run dir. Damaged newer checkpoints are skipped and named;
    a run dir whose checkpoints are all damaged is refused (not silently started afresh)."""
    from lmtrain.train.checkpoint import is_deepspeed_checkpoint, newest_checkpoint

    if resume and no_resume:
        raise ResumeError("--resume and --no-resume exclude each other")
    if resume and not (Path(resume).is_dir() and not is_deepspeed_checkpoint(Path(resume))):
        path = Path(resume)
        if not path.exists():
            raise ResumeError(f"--resume: no checkpoint at {resume}")
    elif no_resume:
        return None
    else:
        run_dir, what = (Path(resume), "--resume") if resume else (cfg.run_dir, "the run dir")
        choice = newest_checkpoint(run_dir)
        for note in choice.notes():
            log(f"run: {run_dir / 'checkpoints'}/{note}")
        if choice.path is None and (resume or choice.skipped):
            why = "; ".join(choice.notes()) or "none there"
            raise ResumeError(f"{what}: no intact checkpoint in {run_dir / 'checkpoints'} ({why}); pass --no-resume "
                              "to start afresh (its files are set aside, not deleted)")
        if choice.skipped and choice.path is not None:
            log(f"run: resuming from {choice.path.name} (step {choice.step}), the newest intact checkpoint")
        path = choice.path
    if path is not None:
        check_checkpoint_format(path, cfg)
    return path


def init_weights(cfg: Config, log=print) -> dict:
    """The weights of `run.init_from` (an export, checkpoint or run dir, ZeRO shards included)
    for a fresh model: the same architecture and the same tokenizer, or refused."""
    from lmtrain.config import ConfigError
    from lmtrain.model import build_model
    from lmtrain.train.checkpoint import CheckpointError, load_trained, tokenizer_path

    src = Path(cfg.run.init_from).expanduser()
    try:
        t = load_trained(src, device="cpu", log=lambda s: log(f"run.init_from: {s}"))
    except (CheckpointError, ConfigError, FileNotFoundError) as e:
        raise ResumeError(f"run.init_from: {e}") from None
    def shape(c: Config) -> dict:  # what the weights depend on
        return {"model": to_dict(c)["model"], "data": {"vocab_size": c.data.vocab_size}}

    for key, theirs_v, ours_v in config_differences(shape(t.cfg), shape(cfg), EXTENSION_KEYS):
        raise ResumeError(f"run.init_from: {src} has {key}={theirs_v!r}, this config {ours_v!r}; "
                          "the weights only fit the same model")
    ours_sd = build_model(cfg, device="meta").state_dict()
    for name, value in t.model.state_dict().items():
        if name in ours_sd and ours_sd[name].shape != value.shape:
            raise ResumeError(f"run.init_from: {name} is {tuple(value.shape)} in {src} and "
                              f"{tuple(ours_sd[name].shape)} here (data.seq_len {t.cfg.data.seq_len} -> "
                              f"{cfg.data.seq_len}); a learned position "
                              "table has no rows for the new positions: extend with rope or a scheme without a table")
    theirs, ours = tokenizer_path(t), Path(cfg.data.dir) / "tokenizer.json"
    if theirs.is_file() and ours.is_file() and theirs.read_bytes() != ours.read_bytes():
        raise ResumeError(f"run.init_from: {src} was trained with another tokenizer than {ours}; "
                          "prepare the data with that tokenizer, or train from scratch")
    log(f"run: weights initialised from {t.checkpoint} (step {t.step}); optimizer and schedule start fresh")
    return t.model.state_dict()


def check_checkpoint_format(path: Path, cfg: Config) -> None:
    """A DeepSpeed checkpoint directory resumes under DeepSpeed with as many ranks as wrote
    it; a Lightning file resumes under the other strategies."""
    from lmtrain.train.checkpoint import deepspeed_world_size, is_deepspeed_checkpoint

    t = cfg.trainer
    if is_deepspeed_checkpoint(path) != (t.strategy == "deepspeed"):
        kind = "a DeepSpeed checkpoint directory" if is_deepspeed_checkpoint(path) else "a Lightning checkpoint file"
        raise ResumeError(
            f"trainer.strategy: {path} is {kind}, which trainer.strategy={t.strategy} cannot resume; resume with the "
            "strategy that wrote it, or `lmtrain export` it and start a new run (--no-resume or another run.name)")
    if is_deepspeed_checkpoint(path) and isinstance(t.devices, int) and t.devices > 0:
        saved, now = deepspeed_world_size(path), t.devices * t.num_nodes
        if saved != now:
            raise ResumeError(
                f"trainer.devices: {path} was written by {saved} ranks and this run has {now} "
                f"(trainer.devices x trainer.num_nodes); ZeRO shards resume only on the same number of ranks")


def build_trainer(cfg: Config, *, extra_callbacks=()):
    import lightning.pytorch as pl
    from lightning.fabric.plugins.environments import SLURMEnvironment
    from lightning.pytorch.callbacks import TQDMProgressBar

    from lmtrain.train.callbacks.checkpointing import RunCheckpoint
    from lmtrain.train.callbacks.config_log import ConfigLog
    from lmtrain.train.callbacks.metrics_file import MetricsFile
    from lmtrain.train.callbacks.preemption import Preemption
    from lmtrain.train.callbacks.progress import ProgressLines
    from lmtrain.train.callbacks.throughput import Throughput
    from lmtrain.train.checkpoint_io import AtomicCheckpointIO
    from lmtrain.train.loggers import build_loggers
    from lmtrain.train.strategy import build_strategy

    t = cfg.trainer
    run_dir = cfg.run_dir
    callbacks = [
        RunCheckpoint(run_dir / "checkpoints", cfg.checkpoint.every_n_steps, cfg.checkpoint.keep_last),
        ConfigLog(cfg),
        Throughput(cfg.data.seq_len, every=t.log_every_n_steps, peak_tflops=t.peak_tflops, precision=t.precision),
        MetricsFile(run_dir / "metrics.jsonl", every=t.log_every_n_steps),
        *extra_callbacks,
    ]
    if cfg.eval.lengths:
        from lmtrain.train.callbacks.eval_length import EvalLength

        callbacks.append(EvalLength(cfg, metrics_path=run_dir / "metrics.jsonl"))
    from lmtrain.train.callbacks.head_stats import HeadStats, PatternPictures

    callbacks.append(HeadStats(every=t.log_every_n_steps, metrics_path=run_dir / "metrics.jsonl",
                               seq_len=cfg.data.seq_len))
    callbacks.append(PatternPictures(cfg.data.seq_len, run_dir / "attention_patterns.png"))
    from lmtrain.train.callbacks.token_stats import TokenStats

    callbacks.append(TokenStats(Path(cfg.data.dir) / "tokenizer.json", metrics_path=run_dir / "metrics.jsonl"))
    callbacks.append(Preemption(run_dir / "checkpoints", every=t.log_every_n_steps))
    plugins = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        # Our Preemption callback saves and requeues; Lightning's own requeue handler stays off.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    tty = sys.stderr.isatty()
    on_cpu = t.accelerator == "cpu" or (t.accelerator == "auto" and not torch.cuda.is_available())
    if t.progress_bar and tty:
        # Refreshing reads the logged tensors back to the host: once per log interval, not
        # every step (a device sync per step on GPU).
        callbacks.append(TQDMProgressBar(refresh_rate=t.log_every_n_steps))
    elif t.progress_bar:
        callbacks.append(ProgressLines(every=t.log_every_n_steps))
    return pl.Trainer(
        accelerator="gpu" if t.accelerator == "cuda" else t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(cfg, on_cpu=on_cpu),
        precision=t.precision,
        max_steps=t.max_steps,
        val_check_interval=t.val_every_n_steps * t.accumulate_grad_batches,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=cfg.optim.grad_clip or None,
        gradient_clip_algorithm="norm",
        deterministic=t.deterministic,
        log_every_n_steps=t.log_every_n_steps,
        logger=build_loggers(cfg),
        callbacks=callbacks,
        plugins=plugins,
        use_distributed_sampler=False,  # our sampler shards the global order itself
        enable_progress_bar=t.progress_bar and tty,
        enable_model_summary=True,
        default_root_dir=str(run_dir),
    )


def unigram_perplexity(data_dir: str, seq_len: int, windows: list[int], vocab_size: int) -> float:
    """Perplexity of the train split's add-one unigram model on the given validation windows
    (the targets of each window, as the model is scored)."""
    from data_pipelines.shards import open_tokens

    train = open_tokens(data_dir, "train")
    counts = np.ones(vocab_size, dtype=np.float64)  # add-one
    chunk = 1 << 26  # count in chunks: the split may be far larger than memory
    for start in range(0, len(train), chunk):
        counts += np.bincount(np.asarray(train[start : start + chunk]), minlength=vocab_size)[:vocab_size]
    logp = np.log(counts / counts.sum())
    val = open_tokens(data_dir, "val")
    targets = np.concatenate([np.asarray(val[w * seq_len + 1 : w * seq_len + seq_len + 1]) for w in windows])
    return float(math.exp(-logp[targets].mean()))


def set_aside_previous(run_dir: Path) -> Optional[Path]:
    """A fresh start in a used run dir moves the old checkpoints and metrics to
    previous/<time>/: nothing is lost, and no later auto-resume can pick an old checkpoint."""
    old = [p for p in (run_dir / "checkpoints", run_dir / "metrics.jsonl", run_dir / "summary.json") if p.exists()]
    if not old:
        return None
    dest = run_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    for p in old:
        p.rename(dest / p.name)
    return dest


def train(cfg: Config, *, resume: Optional[str] = None, no_resume: bool = False, log=print) -> dict:
    """Train; returns the summary dict (on rank 0)."""
    import warnings

    import lightning.pytorch as pl

    # Lightning <= 2.6 calls a torch pytree API that torch 2.13 deprecates; harmless noise.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # DeepSpeed (<= 0.19) calls collectives that torch 2.13 renamed; harmless noise on every step.
    warnings.filterwarnings(
        "ignore", message=r".*`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated.*")

    from data_pipelines.prepare import prepare
    from lmtrain.train.checkpoint import CheckpointError, load_config_from_checkpoint
    from lmtrain.train.checkpoint_io import clean_partial
    from lmtrain.train.data import TokenDataModule
    from lmtrain.train.module import LMModule
    from lmtrain.train.rundir import check_environment, check_run_dir, check_space_for_checkpoints

    quiet = log if is_rank_zero() else (lambda _: None)
    check_environment(cfg)
    check_run_dir(cfg)
    ckpt_path = resolve_resume(cfg, resume, no_resume, log=quiet)
    if ckpt_path is not None:
        try:
            saved, _ = load_config_from_checkpoint(ckpt_path)
        except CheckpointError as e:
            raise ResumeError(f"--resume: {e}" if resume else str(e)) from None
        check_resume_compatible(saved, cfg)

    if is_rank_zero():
        prepare(cfg.data, log=log)
    else:
        wait_for_data(cfg.data)
    datamodule = TokenDataModule(cfg)  # checks data against the config before the run dir is touched
    init_state = None
    if ckpt_path is None and cfg.run.init_from:  # checked before the run dir is touched, too
        init_state = init_weights(cfg, log=quiet)
    check_space_for_checkpoints(cfg, ckpt_path)  # a full disk fails here, before any step is spent

    run_dir = cfg.run_dir
    if is_rank_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        clean_partial(run_dir / "checkpoints")
        if ckpt_path is None:
            moved = set_aside_previous(run_dir)
            if moved:
                log(f"run: fresh start; the previous run's files were moved to {moved}")
        log(f"run: {run_dir} ({'resuming from ' + str(ckpt_path) if ckpt_path else 'fresh start'})")

    pl.seed_everything(cfg.run.seed, workers=True, verbose=False)
    module = LMModule(cfg)
    if init_state is not None:
        module.model.load_state_dict(init_state)
    trainer = build_trainer(cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
    try:
        result = finish(cfg, trainer, module, datamodule, log=log)
    except TrainingStopped:  # every rank raises it at the same step: no collective is left pending
        release_process_group()
        raise
    release_process_group()
    return result


def release_process_group() -> None:
    """Destroy the default process group, if this process joined one, before the interpreter exits.

    Lightning never destroys it. Left to interpreter finalisation, gloo's worker threads may still
    hold tensors of finished collectives, and freeing them then aborts the process ("terminate
    called without an active exception"): the job reports FAILED although training completed.
    Called only where every rank has left its last collective, so it never waits on a peer.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def finish(cfg: Config, trainer, module, datamodule, log=print) -> dict:
    """After `fit`: the preemption report, the final checkpoint and the summary (on rank 0)."""
    from lmtrain.train.callbacks.preemption import Preemption
    from lmtrain.train.checkpoint import checkpoint_step, last_checkpoint
    from lmtrain.train.data import val_windows
    from lmtrain.train.loss import perplexity

    run_dir = cfg.run_dir

    preempted = next((c for c in trainer.callbacks if isinstance(c, Preemption) and c.stopped_at is not None), None)
    if preempted is not None:
        if trainer.is_global_zero:
            log(f"run: stopped at step {preempted.stopped_at} on a signal; "
                + ("the job is requeued and resumes there" if preempted.requeued else "run the same command to resume"))
        return {"preempted": True, "step": preempted.stopped_at, "requeued": preempted.requeued}
    if module.diverged:  # every rank decided the same (lmtrain/train/module.py)
        raise TrainingStopped(module.diverged)

    # The final step is always in a checkpoint, whatever checkpoint.every_n_steps is: export,
    # generate and eval-length read the newest checkpoint, and the summary names last.ckpt.
    newest = last_checkpoint(run_dir)  # every rank reads the same files and decides the same
    if newest is None or checkpoint_step(newest) < trainer.global_step:
        trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt")

    # Final evaluation on the fixed validation windows, reported beside the unigram baseline.
    results = trainer.validate(module, datamodule=datamodule, verbose=False)
    if not trainer.is_global_zero:
        return {}
    val_loss = float(results[0]["val/loss"])
    windows = val_windows(datamodule.val_set.n_windows, cfg.data.val_batches * cfg.data.batch_size * module.data_world)
    summary = {
        "step": trainer.global_step,
        "val_loss": val_loss,
        "val_ppl": perplexity(val_loss),
        "unigram_val_ppl": unigram_perplexity(cfg.data.dir, cfg.data.seq_len, windows, cfg.data.vocab_size),
        "val_tokens_scored": len(windows) * cfg.data.seq_len,
        "last_checkpoint": str(run_dir / "checkpoints" / "last.ckpt"),
        "tensorboard": str(run_dir / "tb") if "tensorboard" in cfg.trainer.loggers else None,
        "metrics": str(run_dir / "metrics.jsonl"),
        "sample_prompt": sample_prompt(cfg),
    }
    if "val/copy_acc" in results[0]:  # the copy probe: accuracy and loss on the copied half
        summary["val_copy_acc"] = float(results[0]["val/copy_acc"])
        summary["val_copy_loss"] = float(results[0]["val/copy_loss"])
    # Valid JSON whatever the numbers (json.dumps would write NaN and Infinity, which are not).
    finite = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in summary.items()}
    (run_dir / "summary.json").write_text(json.dumps(finite, indent=2, allow_nan=False))
    log(format_summary(summary))
    return summary


def format_summary(s: dict) -> str:
    return "\n".join([
        "",
        "== lmtrain: training finished ==",
        f"  step                      {s['step']}",
        f"  validation loss           {s['val_loss']:.4f}  ({s['val_tokens_scored']:,} tokens)",
        f"  validation perplexity     {s['val_ppl']:.2f}",
        f"  unigram perplexity        {s['unigram_val_ppl']:.2f}  (same tokens; add-one unigram of the train split)",
        *([f"  copy accuracy             {s['val_copy_acc']:.4f}  (loss {s['val_copy_loss']:.4f}, on the copied half)"]
          if "val_copy_acc" in s else []),
        f"  checkpoint                {s['last_checkpoint']}",
        *([f"  TensorBoard logs          {s['tensorboard']}",
           f"  open them with            tensorboard --logdir {s['tensorboard']}   (then http://localhost:6006)"]
          if s.get("tensorboard") else []),
        f"  sample from the model     lmtrain generate {Path(s['last_checkpoint']).parent.parent}"
        + (f" --prompt {shlex.quote(s['sample_prompt'])}" if s.get("sample_prompt") else ""),
    ])


def sample_prompt(cfg, max_chars: int = 24) -> str:
    """A prompt like the run's own text, for the end-of-run hint: the opening words of its first
    validation document (so a corpus of novels is not offered `def `). Empty for the copy task
    or when nothing readable is there."""
    if cfg.data.source == "copy":
        return ""
    try:
        from data_pipelines.shards import open_tokens
        from data_pipelines.tokenizer import eos_token_of, load_tokenizer

        tok = load_tokenizer(Path(cfg.data.dir) / "tokenizer.json")
        eos = tok.token_to_id(eos_token_of(cfg.data))
        ids = [int(i) for i in open_tokens(cfg.data.dir, "val")[:64]]
        ids = ids[: ids.index(eos)] if eos in ids else ids
        text = tok.decode(ids).lstrip().split("\n", 1)[0]
    except Exception:  # a hint only: never fail a finished run over it
        return ""
    words, out = text.split(" "), ""
    for w in words:  # whole words, up to max_chars
        if out and len(out) + 1 + len(w) > max_chars:
            break
        out = f"{out} {w}" if out else w
    return out[:max_chars] + (" " if out else "")
