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
    # Per-token quantities (detached, B x L), such as the ACT steps each position took.
    tokens: dict[str, Tensor] = field(default_factory=dict)

    # (loss name, source) pairs already counted by add_loss_once in this forward pass
    counted: set = field(default_factory=set)

    def add_loss(self, name: str, value: Tensor) -> None:
        self.losses[name] = self.losses[name] + value if name in self.losses else value

    def add_loss_once(self, name: str, source: object, value: Tensor) -> None:
        """A loss term of `source`'s parameters alone (a span penalty), counted once per forward
        however often the module runs (a shared block applied step after step)."""
        if (name, id(source)) not in self.counted:
            self.counted.add((name, id(source)))
            self.add_loss(name, value)

    def total_loss(self) -> Tensor | None:
        if not self.losses:
            return None
        return torch.stack([v.float() for v in self.losses.values()]).sum()


@dataclass
class ModelOutput:
    logits_BLV: Tensor
    aux: Aux
