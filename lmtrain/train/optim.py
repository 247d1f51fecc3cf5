"""AdamW parameter groups and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: never on norms, biases, embedding tables or position biases."""
    no_decay = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    # Modules that say so (learned position biases: a bucket table is a matrix, not a weight).
    no_decay |= {id(p) for m in model.modules() if getattr(m, "no_weight_decay", False) for p in m.parameters()}
    decay, rest = [], []
    for _, p in model.named_parameters():  # shared (tied) parameters appear once
        if not p.requires_grad:
            continue
        (rest if p.dim() < 2 or id(p) in no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": rest, "weight_decay": 0.0, "name": "no_decay"}]


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup over `warmup_steps` (step 0 already non-zero), then cosine to min_lr at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, optim_cfg, max_steps: int, *, cpu_offload: bool = False):
    """AdamW and its schedule. cpu_offload: DeepSpeed's vectorised CPU AdamW (the same update),
    for ZeRO with the optimizer offloaded; compiled by DeepSpeed on first use."""
    groups = param_groups(model, optim_cfg.weight_decay)
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                               adamw_mode=True)
    else:
        opt = torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda step: lr_at(step, lr=optim_cfg.lr, min_lr=optim_cfg.min_lr, warmup_steps=optim_cfg.warmup_steps,
                           max_steps=max_steps) / optim_cfg.lr,
    )
    return opt, sched
