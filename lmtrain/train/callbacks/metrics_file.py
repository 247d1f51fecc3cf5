"""Appends logged training scalars to RUN/metrics.jsonl, one JSON object per logged step.

After a resume the steps since the checkpoint appear again; readers keep the last line
for each step (`read_metrics` does).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl


class MetricsFile(pl.Callback):
    def __init__(self, path: str | Path, every: int):
        self.path, self.every = Path(path), every

    def _write(self, trainer, record: dict) -> None:
        if trainer.is_global_zero:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step  # optimizer steps done, so the batch just trained was step `step`
        if step % self.every or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        # Mean over ranks (every rank takes part in the reduction; rank 0 writes).
        loss = trainer.strategy.reduce(pl_module.last_lm_loss, reduce_op="mean")
        rec = {"step": step, "train/loss": float(loss),
               "lr": pl_module.last_lr, "consumed_samples": pl_module.consumed_samples}
        if pl_module.cfg.data.length_schedule:  # a length curriculum: the length this step trained at
            rec["data/seq_len"] = float(pl_module._length)
        # Auxiliary losses and statistics (span, ponder), as rank 0 saw them.
        rec.update({k: round(float(v), 6) for k, v in getattr(pl_module, "last_aux", {}).items()})
        self._write(trainer, rec)

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        if "val/loss" in m:
            self._write(trainer, {"step": trainer.global_step,
                                  **{k: float(m[k]) for k in VAL_KEYS if k in m}})


VAL_KEYS = ("val/loss", "val/copy_acc", "val/copy_loss")  # copy_*: the copy probe (data.source=copy)


def read_metrics(path: str | Path, key: str = "train/loss") -> dict[int, float]:
    """step -> value of `key`, the last occurrence winning."""
    out: dict[int, float] = {}
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        if key in rec:
            out[rec["step"]] = rec[key]
    return out
