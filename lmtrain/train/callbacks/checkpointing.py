"""The run's periodic checkpoints: Lightning's ModelCheckpoint with lmtrain's rules.

  * `stepNNNNNN.ckpt` every `checkpoint.every_n_steps` optimizer steps, and `last.ckpt`
    beside it, written atomically (lmtrain/train/checkpoint_io.py);
  * rotation by lmtrain: after each save the newest `checkpoint.keep_last` step checkpoints
    of the directory stay, whoever wrote the others (a run resumed from a copied step file,
    whose ModelCheckpoint state knows nothing of them, keeps the limit too);
  * no checkpoint is written while the newest optimizer steps were skipped as non-finite
    (lmtrain/train/module.py): the last good checkpoint stays the one a resume finds.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint


def step_checkpoints(ckpt_dir: Path) -> list[Path]:
    """The step checkpoints (files or DeepSpeed directories) of a directory, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(ckpt_dir).glob("step*.ckpt")
             if (m := re.fullmatch(r"step(\d+)\.ckpt", p.name))]
    return [p for _, p in sorted(found)]


class RunCheckpoint(ModelCheckpoint):
    def __init__(self, ckpt_dir: Path, every_n_steps: int, keep_last: int):
        super().__init__(dirpath=ckpt_dir, filename="step{step:06d}", auto_insert_metric_name=False,
                         every_n_train_steps=every_n_steps, save_top_k=-1, save_last=True,
                         save_on_train_epoch_end=False,
                         # last.ckpt is always the newest state, whoever wrote it (a preemption
                         # save too): overwrite it, never write last-v1.ckpt beside it.
                         enable_version_counter=False)
        self.keep_last = keep_last

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if getattr(pl_module, "bad_streak", 0):  # every rank holds the same count
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if trainer.is_global_zero and Path(filepath).name.startswith("step"):
            for old in step_checkpoints(Path(filepath).parent)[: -self.keep_last]:
                shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
