"""Periodic length-extrapolation evaluation during training (`eval.lengths`).

Rank 0 scores a fixed slice of the validation split at each length (the same tokens
every time, so the curves are comparable across steps) and logs
eval_length/<mode>/ppl_L<length> to TensorBoard and metrics.jsonl. The other ranks wait
at a barrier; under DeepSpeed ZeRO-3, where every forward gathers parameter shards from all
ranks, every rank runs the same evaluation and rank 0 alone reports it. The evaluation
draws no random numbers, so training continues exactly as it would have without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl

from lmtrain.evaluate.length import Plan, evaluate_length, make_plans
from lmtrain.train.loggers import log_scalars


class EvalLength(pl.Callback):
    def __init__(self, cfg, metrics_path: Path | None = None):
        self.cfg = cfg
        self.e = cfg.eval
        self.every = self.e.every_n_steps or cfg.trainer.val_every_n_steps
        self.metrics_path = metrics_path
        self._plans = None
        self._last_step = -1

    def plans(self) -> dict[int, Plan]:
        if self._plans is None:
            from data_pipelines.shards import read_meta

            n_tokens = read_meta(self.cfg.data.dir)["splits"]["val"]["tokens"]
            self._plans = make_plans(n_tokens, self.e.lengths, self.e.mode, self.e.stride or None, self.e.max_tokens)
        return self._plans

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self._last_step or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        if step % self.every and step != trainer.max_steps:
            return
        self._last_step = step
        sharded = bool(getattr(trainer.strategy, "zero_stage_3", False))
        if trainer.is_global_zero or sharded:
            with pl_module.model.whole_sequences():  # one process scores whole sequences
                self.evaluate(trainer, pl_module.model, step, report=trainer.is_global_zero)
        trainer.strategy.barrier("eval_length")

    def evaluate(self, trainer, model, step: int, report: bool = True) -> dict[str, float]:
        from data_pipelines.shards import open_tokens

        tokens = open_tokens(self.cfg.data.dir, "val")
        was_training = model.training
        model.eval()
        metrics, shown = {}, []
        try:
            for L, plan in self.plans().items():
                r = evaluate_length(model, tokens, plan, batch_tokens=self.e.batch_tokens, buckets_per_octave=1,
                                    device=next(model.parameters()).device)
                if r.status == "ok":
                    metrics[f"eval_length/{self.e.mode}/ppl_L{L}"] = r.ppl
                shown.append(f"L={L} {r.ppl:.2f}" if r.status == "ok" else f"L={L} n/a ({r.reason})")
        finally:
            model.train(was_training)
        if not report:
            return metrics
        log_scalars(trainer, metrics, step)
        if self.metrics_path is not None and metrics:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        print(f"eval-length step {step} ({self.e.mode}): perplexity {', '.join(shown)}", flush=True)
        return metrics
