"""Per-head statistics of the model's modules (`head_stats` hooks, lmtrain/model/hooks.py),
such as the spans that adaptive-span heads learn.

On logging steps: `NAME/layerI/headH` scalars, `NAME/mean` and `NAME/max` over all heads
(TensorBoard), and a line in metrics.jsonl with the per-layer values. At each validation
and at the end of training: a histogram per layer (`NAME/layerI`) and a heatmap image of
layers x heads (`NAME/heatmap`), and for each learned function of the distance
(`distance_profile` hooks: a position scheme's bias, DA's rescaling) a heatmap of its value
per layer and head against the distance (`NAME/distance`), up to 32x the training length.

`PatternPictures`: at the start of training, a picture of each layer's attention pattern
(`attention/pattern` in TensorBoard, and RUN/attention_patterns.png), for models whose
kernels have one (sparse).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch

from lmtrain.train.loggers import log_scalars, tensorboard_writer


def heatmap_figure(name: str, rows: list[torch.Tensor], limit: float | None, step: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = torch.stack(rows).numpy()
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * data.shape[1], 1.0 + 0.4 * data.shape[0]), dpi=100)
    low = min(0.0, float(data.min()))  # learned values may be negative (DA's w)
    im = ax.imshow(data, cmap="viridis", vmin=low, vmax=limit or float(data.max()), aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(data.shape[1]))
    ax.set_yticks(range(data.shape[0]))
    top = limit or float(data.max())
    big = float(np.abs(data).max()) >= 10
    for (i, j), v in np.ndenumerate(data):
        ax.text(j, i, f"{v:.0f}" if big else f"{v:.2g}", ha="center", va="center", fontsize=7,
                color="white" if v < (low + top) / 2 else "black")
    ax.set_title(f"{name} per layer and head, step {step}")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def profile_figure(name: str, rows: list[torch.Tensor], d: torch.Tensor, step: int):
    """A heatmap of a learned function of the distance: one row per layer and head, one column
    per distance in d (0, 1, 2, 4, ...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = torch.cat(rows).numpy()  # (modules x H) x n
    n_heads = rows[0].shape[0]
    fig, ax = plt.subplots(figsize=(2.0 + 0.45 * data.shape[1], 1.0 + 0.22 * data.shape[0]), dpi=100)
    im = ax.imshow(data, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(d)))
    ax.set_xticklabels([str(int(x)) for x in d], rotation=90, fontsize=7)
    ax.set_yticks(range(data.shape[0]))
    ax.set_yticklabels([f"L{i // n_heads} h{i % n_heads}" if len(rows) > 1 else f"head {i}"
                        for i in range(data.shape[0])], fontsize=7)
    ax.set_xlabel("distance i - j")
    ax.set_title(f"{name} against distance, step {step}")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


class HeadStats(pl.Callback):
    def __init__(self, every: int, metrics_path: Path | None = None, seq_len: int = 1):
        self.every, self.metrics_path, self.seq_len = every, metrics_path, seq_len

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every or (batch_idx + 1) % trainer.accumulate_grad_batches or not trainer.is_global_zero:
            return
        stats, _ = pl_module.model.head_stats()
        if not stats:
            return
        scalars, record = {}, {"step": step}
        for name, rows in stats.items():
            if any(r.numel() == 0 for r in rows):  # parameters sharded away (ZeRO-3): nothing to show here
                continue
            for i, r in enumerate(rows):
                scalars.update({f"{name}/layer{i}/head{h}": float(v) for h, v in enumerate(r)})
                record[f"{name}/layer{i}"] = [round(float(v), 3) for v in r]
            flat = torch.cat(rows)
            scalars[f"{name}/mean"] = record[f"{name}/mean"] = float(flat.mean())
            scalars[f"{name}/max"] = record[f"{name}/max"] = float(flat.max())
        log_scalars(trainer, scalars, step)
        if self.metrics_path is not None:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _pictures(self, trainer, pl_module):
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        stats, limits = pl_module.model.head_stats()
        step = trainer.global_step
        for name, rows in stats.items():
            if any(r.numel() == 0 for r in rows):
                continue
            for i, r in enumerate(rows):
                writer.add_histogram(f"{name}/layer{i}", r, global_step=step)
            writer.add_figure(f"{name}/heatmap", heatmap_figure(name, rows, limits.get(name), step), global_step=step)
        from lmtrain.inspection import profile_distances

        d = profile_distances(self.seq_len)
        for name, rows in pl_module.model.distance_profiles(d).items():
            if any(r.numel() == 0 for r in rows):
                continue
            writer.add_figure(f"{name}/distance", profile_figure(name, rows, d, step), global_step=step)

    def on_validation_epoch_end(self, trainer, pl_module):
        self._pictures(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._pictures(trainer, pl_module)


class PatternPictures(pl.Callback):
    def __init__(self, seq_len: int, png_path: Path):
        self.seq_len, self.png_path = seq_len, png_path

    def on_train_start(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        from lmtrain.evaluate.patterns import pattern_figure, picture_length

        model = pl_module.model
        if not model.hooks.patterns:
            return
        fig = pattern_figure(model.pattern_masks(picture_length(self.seq_len)))  # drawn once: PNG and TensorBoard
        fig.savefig(self.png_path, bbox_inches="tight")
        self.png_path.chmod(0o644)
        writer = tensorboard_writer(trainer)
        if writer is not None:
            writer.add_figure("attention/pattern", fig, global_step=trainer.global_step)  # closes it
        else:
            import matplotlib.pyplot as plt

            plt.close(fig)
