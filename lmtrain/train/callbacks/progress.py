"""Plain progress lines for logs that are not terminals (CI, SLURM output files).

Every `every` optimizer steps, rank 0 prints one line: step, loss, lr, tokens/s, ETA.
A terminal gets Lightning's TQDM bar instead.
"""

from __future__ import annotations

import time

import lightning.pytorch as pl


class ProgressLines(pl.Callback):
    def __init__(self, every: int):
        self.every = every
        self._t0 = None
        self._step0 = 0

    def on_train_start(self, trainer, pl_module):
        self._t0, self._step0 = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if not trainer.is_global_zero or step % self.every or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        elapsed = time.perf_counter() - self._t0
        rate = (step - self._step0) / max(elapsed, 1e-9)
        eta = (trainer.max_steps - step) / rate if rate > 0 else float("nan")
        m = trainer.callback_metrics
        parts = [f"step {step}/{trainer.max_steps}"]
        if "train/loss" in m:
            parts.append(f"loss {float(m['train/loss']):.4f}")
        if "val/loss" in m:
            parts.append(f"val {float(m['val/loss']):.4f}")
        if "val/copy_acc" in m:
            parts.append(f"copy acc {float(m['val/copy_acc']):.3f}")
        parts.append(f"lr {getattr(pl_module, 'last_lr', 0.0):.2e}")
        if "perf/tokens_per_s" in m:
            parts.append(f"{float(m['perf/tokens_per_s']):,.0f} tok/s")
            parts.append(f"mfu {float(m['perf/mfu']):.1%}")
        parts.append(f"eta {_fmt(eta)}")
        print(" | ".join(parts), flush=True)


def _fmt(seconds: float) -> str:
    if seconds != seconds:
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
