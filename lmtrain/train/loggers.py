"""The run's loggers (`trainer.loggers`: tensorboard, csv, wandb), through Lightning's own.

One step axis everywhere: the optimizer step, 1..N. The module logs `step` with its
metrics (Lightning then uses that value as the x coordinate instead of its count of batches
before the step), and what callbacks write themselves (eval-length scalars, per-head
statistics, histograms, figures) and `metrics.jsonl` use `trainer.global_step` after the
step, the same number.
"""

from __future__ import annotations

import math
from pathlib import Path

LOGGERS = ("tensorboard", "csv", "wandb")
WANDB_MODES = ("online", "offline", "disabled")
WANDB_ID_FILE = "wandb_run_id"  # in the run dir: a resumed run continues the same W&B run


def build_loggers(cfg) -> list:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    run_dir = Path(cfg.run_dir)
    out = []
    for name in cfg.trainer.loggers:
        if name == "tensorboard":
            out.append(TensorBoardLogger(save_dir=str(run_dir), name="tb", version="", default_hp_metric=False))
        elif name == "csv":
            out.append(CSVLogger(save_dir=str(run_dir), name="csv", version=""))
        elif name == "wandb":
            out.append(_wandb(cfg, run_dir))
    return out


def _wandb(cfg, run_dir: Path):
    import secrets

    from lightning.pytorch.loggers import WandbLogger

    w = cfg.wandb
    id_file = run_dir / WANDB_ID_FILE
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = secrets.token_hex(4)
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
    return WandbLogger(project=w.project, entity=w.entity, name=w.name or cfg.run.name, tags=list(w.tags),
                       save_dir=str(run_dir), mode=w.mode, id=run_id, resume="allow", log_model=False)


def tensorboard_writer(trainer):
    """The SummaryWriter of the run's TensorBoard logger (histograms, figures, text), or None."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for lg in trainer.loggers:
        if isinstance(lg, TensorBoardLogger):
            return lg.experiment
    return None


def log_scalars(trainer, metrics: dict, step: int) -> None:
    """Scalars a callback computed, into every logger at `step` (rank 0 only)."""
    if metrics and trainer.is_global_zero:
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=step)


def log_config(trainer, cfg) -> None:
    """The resolved config: TensorBoard's HParams tab (every key, and `hp/val_loss` as its
    metric column) and a text panel with the YAML. Lightning logs the hyperparameters to the
    CSV (hparams.yaml) and W&B (the run's config) itself."""
    from lmtrain.config import flatten, to_dict, to_yaml

    writer = tensorboard_writer(trainer)
    if writer is None or not trainer.is_global_zero:
        return
    from torch.utils.tensorboard.summary import hparams

    params = {k: (v if isinstance(v, (int, float, str, bool)) and not (isinstance(v, float) and math.isnan(v))
                  else str(v)) for k, v in flatten(to_dict(cfg)).items()}
    file_writer = writer._get_file_writer()
    for summary in hparams(params, {"hp/val_loss": 0.0}):  # the metric names the column; values come from scalars
        file_writer.add_summary(summary, trainer.global_step)
    writer.add_text("config", "```yaml\n" + to_yaml(cfg) + "```", global_step=trainer.global_step)

