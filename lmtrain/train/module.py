"""The LightningModule: loss, optimizer, schedule, the non-finite guard, and the state that
exact resume needs.

The non-finite guard (`trainer.max_bad_steps`): an optimizer step whose loss or gradient
norm is not finite is skipped, not applied. Without DeepSpeed every gradient is dropped
before the step (AdamW leaves a parameter without a gradient untouched: no update, no
moment decay); DeepSpeed's ZeRO optimizer skips such steps itself (fp32 with gradient
clipping, fp16, and bf16 with `check_grad_overflow`, which lmtrain sets). The ranks decide
together (a max-reduce), one host synchronisation per optimizer step. Skipped steps are
counted (`train/skipped_steps`); after `max_bad_steps` in a row training stops, no
checkpoint having been written since the last good step (the one a resume finds), and
`lmtrain train` exits 2.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from lmtrain.config import Config, to_dict
from lmtrain.model import build_model
from lmtrain.train.loss import chunked_lm_loss, lm_loss, loss_chunk, perplexity
from lmtrain.train.optim import build_optimizer

CKPT_KEY = "lmtrain"


__all__ = ["LMModule", "lm_loss", "perplexity", "step_seed"]


def step_seed(seed: int, sample: int, rank: int) -> int:
    """The RNG seed of the micro-step that starts at global `sample`: a pure function, so
    dropout replays exactly after a resume with no RNG state to save."""
    return (seed * 6_364_136_223_846_793_005 + sample * 1_442_695_040_888_963_407 + rank) % 2**63


class LMModule(pl.LightningModule):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.save_hyperparameters({"config": to_dict(cfg)})
        self.model = build_model(cfg)
        if cfg.data.document_mask:
            from data_pipelines.shards import read_meta

            # The tokenizer's end-of-document id, from the prepared data (then in the state dict).
            self.model.document_eot.fill_(int(read_meta(cfg.data.dir)["eot_id"]))
        self.model.set_activation_checkpointing(cfg.trainer.activation_checkpointing)
        if cfg.trainer.compile:
            # In place: the module (and its kernels, state dict) stay the same objects.
            self.model.compile()
            self.model.features = torch.compile(self.model.features)  # the fused-loss path calls it
        self.consumed_samples = 0  # global samples consumed by training so far
        self.bad_streak = 0  # optimizer steps skipped in a row for a non-finite loss or gradient norm
        self.bad_steps = 0  # all skipped steps
        self.diverged: str | None = None  # why training stopped, when the guard stopped it
        self._bad_loss = torch.zeros((), dtype=torch.bool)  # a micro-batch since the last step had a non-finite loss
        self._skip = False
        self._ds_skipped = 0  # DeepSpeed's count of skipped steps, as of the last step
        zero3 = cfg.trainer.strategy == "deepspeed" and cfg.deepspeed.zero_stage == 3
        self._fused_loss = not zero3 and hasattr(self.model, "head")

    # -- sequence parallelism (lmtrain/train/sequence.py) ------------------------------------
    def setup(self, stage):
        n = self.cfg.trainer.sequence_parallel
        if n > 1 and self.model.sequence_shard is None:  # after the process group exists
            from lmtrain.train.sequence import ulysses_shard

            self.model.shard_sequence(ulysses_shard(n, self.trainer.global_rank, self.trainer.world_size))

    @property
    def data_world(self) -> int:
        """Micro-batches per micro-step across all processes (a sequence group reads one)."""
        from lmtrain.train.sequence import data_parallel

        return data_parallel(self.trainer.global_rank, self.trainer.world_size, self.cfg.trainer.sequence_parallel)[1]

    def _targets(self, batch):
        """(inputs: the whole window's ids, targets: this process's positions of it)."""
        x_BL, y_BL = batch[:, :-1], batch[:, 1:]
        shard = self.model.sequence_shard
        return x_BL, (y_BL if shard is None else y_BL[:, shard.positions(y_BL.shape[1])])

    def _loss(self, x_BL, y_BL):
        """(LM loss, aux). The head and the loss are fused in chunks when the full float32
        logits would be large (trainer.loss_chunk_tokens). y_BL: the targets of the positions
        this process computes (all of x_BL's, or its sequence shard's)."""
        chunk = loss_chunk(self.cfg.trainer.loss_chunk_tokens, y_BL.numel(), self.cfg.data.vocab_size)
        if chunk and self._fused_loss:
            h_BLM, aux = self.model.features(x_BL)
            loss = chunked_lm_loss(h_BLM, self.model.head.weight, y_BL, chunk)
        else:
            out = self.model(x_BL)
            loss, aux = lm_loss(out.logits_BLV, y_BL), out.aux
        # Terms that need the targets (early exit: the other exits' losses), readouts in chunks.
        chunk = chunk or loss_chunk(-1, y_BL.numel(), self.cfg.data.vocab_size)
        for name, value in self.model.target_losses(aux, y_BL, chunk).items():
            aux.add_loss(name, value)
        return loss, aux

    def forward(self, idx_BL):
        return self.model(idx_BL)

    def on_train_start(self):
        engine = self._deepspeed_engine()
        self._ds_skipped = engine.skipped_steps if engine is not None else 0  # restored by a resume

    def on_train_batch_start(self, batch, batch_idx):
        torch.manual_seed(step_seed(self.cfg.run.seed, self.consumed_samples, self.global_rank))

    def training_step(self, batch, batch_idx):
        x_BL, y_BL = self._targets(batch)
        loss, out_aux = self._loss(x_BL, y_BL)
        self.log("train/loss", loss, prog_bar=True, batch_size=x_BL.shape[0])
        self.log("train/ppl", perplexity(loss.detach()), batch_size=x_BL.shape[0])
        aux = out_aux.total_loss()
        for name, value in out_aux.losses.items():
            self.log(f"train/{name}", value, batch_size=x_BL.shape[0])
        scalars = {f"train/{k}": v.detach() for k, v in out_aux.losses.items()}
        for name, value in out_aux.stats.items():
            if value.numel() == 1:
                self.log(f"stats/{name}", value.float(), batch_size=x_BL.shape[0])
                scalars[f"stats/{name}"] = value.detach()
        self.last_aux = scalars  # this rank's auxiliary losses and scalar stats (metrics.jsonl)
        self.last_lm_loss = loss.detach()
        self.last_lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        # The x coordinate of every logger: the optimizer step this batch trains, 1..N (Lightning
        # would use its count of steps done before it, 0..N-1). lmtrain/train/loggers.py.
        self.log("step", float(self.trainer.global_step + 1), batch_size=x_BL.shape[0])
        self._report_length(x_BL)
        self.log("lr", self.last_lr, batch_size=x_BL.shape[0])
        # Counted here, not in on_train_batch_end: callbacks (the checkpoint among them)
        # run before the module's own batch-end hook.
        self.consumed_samples += x_BL.shape[0] * self.data_world
        weighted = loss if out_aux.lm_weight == 1.0 else out_aux.lm_weight * loss  # early exit: the last exit's weight
        total = weighted if aux is None else weighted + aux
        self._bad_loss = self._bad_loss.to(total.device) | ~torch.isfinite(total.detach())
        return total

    def _report_length(self, x_BL) -> None:
        """The training length (a length curriculum changes it): logged, and announced on change."""
        B, L = x_BL.shape
        if self.cfg.data.length_schedule:
            self.log("data/seq_len", float(L), batch_size=B)
        if L != getattr(self, "_length", None) and self.trainer.is_global_zero:
            print(f"step {self.trainer.global_step + 1}: training at length {L}, micro-batch {B}", flush=True)
        self._length = L

    def validation_step(self, batch, batch_idx):
        # The full model's loss: per-token exits (early exit's model.depth.measure) are measured
        # on the validation sample by the TokenStats callback and by `lmtrain eval-exit`.
        with self.model.depth.full_depth():
            return self._validation_step(batch)

    def _validation_step(self, batch):
        x_BL, y_BL = self._targets(batch)
        B = x_BL.shape[0]
        if self.cfg.data.source == "copy":  # the copy probe: also scored on its copied half
            from lmtrain.evaluate.probes import copy_scores

            out = self.model(x_BL)
            logits, aux = out.logits_BLV, out.aux
            loss = lm_loss(logits, y_BL)
            copy_loss, copy_acc = copy_scores(logits, y_BL, x_BL.shape[1])
            self.log("val/copy_loss", copy_loss, on_epoch=True, sync_dist=True, batch_size=B)
            self.log("val/copy_acc", copy_acc, on_epoch=True, sync_dist=True, batch_size=B, prog_bar=True)
        else:
            loss, aux = self._loss(x_BL, y_BL)
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=B, prog_bar=True)
        # Statistics only evaluation computes (LSH's attention mass recovered per round), averaged.
        for name, value in aux.stats.items():
            if value.numel() == 1:
                self.log(f"val_stats/{name}", value.float(), on_epoch=True, sync_dist=True, batch_size=B)
        return loss

    def on_validation_epoch_end(self):
        loss = self.trainer.callback_metrics.get("val/loss")
        if loss is not None:
            # the loss is already synced: every rank holds the same value
            self.log("val/ppl", perplexity(loss), sync_dist=True)
            self.log("hp/val_loss", loss, sync_dist=True)  # TensorBoard's HParams column
        self.log("step", float(self.trainer.global_step))  # validation follows step N: it is at N

    def on_before_optimizer_step(self, optimizer):
        if self._deepspeed_engine() is not None:  # gradients live in DeepSpeed's buffers
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        bad = self._bad_loss
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            self.log("train/grad_norm", norm)
            bad = bad.to(norm.device) | ~torch.isfinite(norm)
        if self._agreed(bad):
            for p in self.parameters():
                p.grad = None  # the step changes nothing

    def _agreed(self, bad: torch.Tensor) -> bool:
        """Whether any rank saw a non-finite loss or gradient norm (one host sync per step)."""
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad.float(), reduce_op="max") > 0
        self._skip = bool(bad)
        return self._skip

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        engine = self._deepspeed_engine()
        if engine is not None:  # DeepSpeed skipped it, or its loss was not finite (DeepSpeed may not check)
            self._agreed(self._bad_loss | torch.tensor(engine.skipped_steps > self._ds_skipped))
            self._ds_skipped = engine.skipped_steps
        self._bad_loss = torch.zeros((), dtype=torch.bool)
        self._count_skip()
        self.model.after_optimizer_step()
        if engine is not None:  # the norm DeepSpeed clipped with, before clipping
            norm = engine.get_global_grad_norm()
            if norm is not None:  # kept a tensor where it is one: no host sync per step
                self.log("train/grad_norm", torch.as_tensor(norm, dtype=torch.float32))

    def _count_skip(self) -> None:
        if not self._skip:
            self.bad_streak = 0
            return
        self._skip = False
        self.bad_streak += 1
        self.bad_steps += 1
        # The trainer counts this step once the hook returns: it is step global_step + 1.
        step, limit = self.trainer.global_step + 1, self.cfg.trainer.max_bad_steps
        self.log("train/skipped_steps", float(self.bad_steps))
        if self.trainer.is_global_zero:
            print(f"step {step}: non-finite loss or gradient norm; step skipped ({self.bad_streak} in a row, "
                  f"stop at {limit})", flush=True)
        if self.bad_streak >= limit:
            self.diverged = (f"training stopped at step {step}: {self.bad_streak} optimizer steps in a row "
                             f"({step - self.bad_streak + 1}-{step}) had a non-finite loss or gradient norm and were "
                             f"skipped (trainer.max_bad_steps={limit}); no checkpoint was written since step "
                             f"{step - self.bad_streak}, the last good one; lower optim.lr (now {self.cfg.optim.lr:g}) "
                             "or check the data, then run again")
            self.trainer.should_stop = True

    def _deepspeed_engine(self):
        return getattr(self.trainer.strategy, "deepspeed_engine", None)

    def configure_optimizers(self):
        offload = self.cfg.trainer.strategy == "deepspeed" and self.cfg.deepspeed.offload_optimizer
        decay = self.cfg.optim.decay_steps or self.cfg.trainer.max_steps
        opt, sched = build_optimizer(self.model, self.cfg.optim, decay, cpu_offload=offload)
        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1, "name": "lr"}}

    def on_save_checkpoint(self, checkpoint):
        checkpoint[CKPT_KEY] = {"consumed_samples": self.consumed_samples, "format": 1, "bad_steps": self.bad_steps,
                                "bad_streak": self.bad_streak}

    def on_load_checkpoint(self, checkpoint):
        state = checkpoint.get(CKPT_KEY, {})
        self.consumed_samples = int(state.get("consumed_samples", 0))
        self.bad_steps, self.bad_streak = int(state.get("bad_steps", 0)), int(state.get("bad_streak", 0))

