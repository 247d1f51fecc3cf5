"""Tokens per second and model FLOPs utilisation (MFU) against a stated peak."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import torch

from lmtrain.model.flops import training_flops_per_token
from lmtrain.train.hardware import peak_flops


class Throughput(pl.Callback):
    """Measures over windows of `every` optimizer steps; synchronises only at window edges."""

    def __init__(self, seq_len: int, every: int, peak_tflops: float | None = None, precision: str = "32-true"):
        self.seq_len, self.every, self.peak_tflops, self.precision = seq_len, every, peak_tflops, precision
        self._t0 = None
        self._tokens = 0
        self.peak, self.peak_source, self.flops_per_token = None, "", 0.0
        self.last: dict[str, float] = {}

    def setup(self, trainer, pl_module, stage):
        # Counted before the strategy wraps the model: ZeRO-3 leaves each rank a shard only.
        self.flops_per_token = training_flops_per_token(pl_module.model, self.seq_len)

    def on_train_start(self, trainer, pl_module):
        self.peak, self.peak_source = peak_flops(self.peak_tflops, pl_module.device, self.precision)
        self._t0 = None
        if trainer.is_global_zero:
            print(f"mfu: peak {self.peak / 1e12:.3f} TFLOP/s per device ({self.peak_source}; pin it with "
                  f"trainer.peak_tflops); {self.flops_per_token / 1e6:.1f} MFLOP per token", flush=True)
        pl_module.log("perf/peak_tflops", self.peak / 1e12, sync_dist=True)  # mean over ranks

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._t0 is None:  # the first window starts at the first batch, not at setup
            self._sync(pl_module)
            self._t0, self._tokens = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # Tokens of the global batch: a sequence-parallel group shares its micro-batch.
        self._tokens += batch.shape[0] * (batch.shape[1] - 1) * getattr(pl_module, "data_world", trainer.world_size)
        if (batch_idx + 1) % trainer.accumulate_grad_batches or trainer.global_step % self.every:
            return
        self._sync(pl_module)
        dt = time.perf_counter() - self._t0
        tps = self._tokens / dt
        mfu = tps * self.flops_per_token / (self.peak * trainer.world_size)
        self.last = {"perf/tokens_per_s": tps, "perf/mfu": mfu}
        pl_module.log_dict(self.last, rank_zero_only=True)
        self._t0, self._tokens = time.perf_counter(), 0

    @staticmethod
    def _sync(pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
