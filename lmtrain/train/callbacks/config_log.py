"""Logs the resolved config when training starts: TensorBoard's HParams tab and a text panel
(lmtrain/train/loggers.py:log_config)."""

from __future__ import annotations

import lightning.pytorch as pl

from lmtrain.train.loggers import log_config


class ConfigLog(pl.Callback):
    def __init__(self, cfg):
        self.cfg = cfg

    def on_train_start(self, trainer, pl_module):
        log_config(trainer, self.cfg)
