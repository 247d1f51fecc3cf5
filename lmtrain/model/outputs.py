"""What a forward pass returns: logits plus auxiliary losses and statistics.

Mechanisms such as adaptive span (span loss, per-head spans) and ACT (ponder loss,
halting steps) report through `Aux` rather than through globals or module state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Aux:
    # Added to the LM loss by the trainer; each is also logged under its name.
    losses: dict[str, Tensor] = field(default_factory=dict)
    # Logged only (detached); scalars or small tensors such as per-head spans.
    stats: dict[str, Tensor] = field(default_factory=dict)

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
