"""Per-token statistics of the model (`Aux.tokens`; ACT: steps per token) on a fixed sample
of validation text, at each validation and at the end of training.

TensorBoard: a histogram `NAME/histogram` over the sample, and an image `NAME/sample` of the
first sample's tokens coloured by their value. metrics.jsonl: a line with the counts per
value (`NAME/hist`) and the mean. The training-step scalars (mean and max ponder) are logged
by the module from `Aux.stats`.

The sample is measured on every rank (under ZeRO-3 the forward pass gathers parameters
collectively), and rank 0 reports.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import torch

from lmtrain.evaluate.tokens import integer_histogram, measure, sample_figure
from lmtrain.train.loggers import tensorboard_writer

SAMPLE_WINDOWS = 4


class TokenStats(pl.Callback):
    def __init__(self, tokenizer_path: Path | None = None, metrics_path: Path | None = None):
        self.tokenizer_path, self.metrics_path = tokenizer_path, metrics_path
        self.sample_NL: torch.Tensor | None = None
        self.enabled = True

    def _sample(self, trainer) -> torch.Tensor | None:
        if self.sample_NL is None:
            from lmtrain.train.data import validation_sample

            val_set = getattr(trainer.datamodule, "val_set", None)
            if val_set is None or len(val_set) == 0:
                return None
            self.sample_NL = validation_sample(val_set, SAMPLE_WINDOWS)[:, :-1]
        return self.sample_NL

    def _report(self, trainer, pl_module):
        if not self.enabled or trainer.sanity_checking:
            return
        sample = self._sample(trainer)
        if sample is None:
            return
        stats = measure(pl_module.model, sample.to(pl_module.device))
        if not stats:
            self.enabled = False  # this model reports nothing per token
            return
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        limits = pl_module.model.depth.token_stat_limits()
        record = {"step": step}
        for name, values in stats.items():
            limit = limits.get(name)
            if values.dtype.is_floating_point:  # a continuous statistic: its mean only
                record[f"{name}/mean"] = round(float(values.mean()), 4)
                continue
            hist = integer_histogram(values, int(limit) if limit else None)
            record[f"{name}/hist"] = hist
            record[f"{name}/mean"] = round(float(values.float().mean()), 4)
            writer = tensorboard_writer(trainer)
            if writer is not None:
                writer.add_histogram(f"{name}/histogram", values.flatten().float(), global_step=step, bins="auto")
                fig = sample_figure(self._token_texts(sample[0]), values[0].tolist(), name=name, limit=limit,
                                    title=f"{name} per token, validation sample, step {step}")
                writer.add_figure(f"{name}/sample", fig, global_step=step)
        if self.metrics_path is not None:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _token_texts(self, ids_L: torch.Tensor) -> list[str]:
        if self.tokenizer_path is None or not Path(self.tokenizer_path).is_file():
            return [str(int(i)) for i in ids_L]
        from data_pipelines.tokenizer import load_tokenizer

        tok = load_tokenizer(self.tokenizer_path)
        return [tok.decode([int(i)]) for i in ids_L]

    def on_validation_epoch_end(self, trainer, pl_module):
        self._report(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._report(trainer, pl_module)
