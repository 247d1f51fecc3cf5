"""What a forward pass returns: logits plus auxiliary losses and statistics.

Mechanisms report through `Aux` rather than through globals or module state: ACT its
ponder loss and halting steps, any module its parameter losses (adaptive span's span
loss, collected by the decoder: lmtrain/model/hooks.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor


@dataclass
class Aux:
    # Added to the LM loss by the trainer; each is also logged under its name.
    losses: dict[str, Tensor] = field(default_factory=dict)
    # Logged only (detached); scalars or small tensors such as per-head spans.
    stats: dict[str, Tensor] = field(default_factory=dict)
    # Per-token quantities (detached, B x L), such as the ACT steps each position took.
    tokens: dict[str, Tensor] = field(default_factory=dict)
    # Intermediate exits' states for losses that need the targets (early_exit: ExitOutputs).
    exits: Any = None
    # The weight of the LM loss of the final output in the training objective (early exit: the
    # last exit's weight; the other exits' weighted losses come through the TargetLosses hook).
    lm_weight: float = 1.0
    # The LM logits of the final states where a depth module already computed them (early exit
    # while decoding: every token of the step left at an exit whose measure read its logits).
    logits: Optional[Tensor] = None

    def add_loss(self, name: str, value: Tensor) -> None:
        self.losses[name] = self.losses[name] + value if name in self.losses else value

    def total_loss(self) -> Tensor | None:
        if not self.losses:
            return None
        return torch.stack([v.float() for v in self.losses.values()]).sum()


@dataclass
class ModelOutput:
    logits_BLV: Tensor
    aux: Aux
