"""Optional lifecycle hooks of the model's modules, as protocols.

Any module of the model (an attention kernel, a positional scheme, a depth module) may
implement any of these; the decoder finds the implementers once, at construction
(`Hooks.collect`), and the trainer, the loss and the statistics callbacks go through it:

  * `after_optimizer_step()` - after every optimizer step (adaptive span's clamp, random
                               feature redraws);
  * `parameter_losses()`     - loss terms of the module's own parameters alone (the span
                               loss), added once per forward by the decoder, whatever the
                               wiring (a shared block applied many times, or layers run
                               without a graph by the reversible wiring);
  * `head_stats()` and `head_stat_limits()` - learned per-head quantities (name -> H
                               values) and their upper limits, logged per layer and head
                               and printed by `lmtrain inspect`;
  * `distance_profile(d)`    - learned functions of the distance (name -> H x n values at the
                               distances d): a position scheme's bias, the DA-Transformer's
                               weights; drawn as a heatmap per module and printed by `inspect`;
  * `pattern_mask(L)`        - which keys each query may see on positions 0 .. L - 1
                               (H' x L x L; sparse patterns), drawn as a picture per layer;
  * `target_losses(aux, y, readout, chunk)` - loss terms that need the targets, from what the
                               forward left in `aux` (early exit: the intermediate exits' LM
                               losses and the halting loss); the trainer adds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class AfterOptimizerStep(Protocol):
    def after_optimizer_step(self) -> None: ...


@runtime_checkable
class ParameterLosses(Protocol):
    def parameter_losses(self) -> dict[str, Tensor]: ...


@runtime_checkable
class HeadStatistics(Protocol):
    def head_stats(self) -> dict[str, Tensor]: ...

    def head_stat_limits(self) -> dict[str, float]: ...


@runtime_checkable
class DistanceProfile(Protocol):
    def distance_profile(self, d: Tensor) -> dict[str, Tensor]: ...


@runtime_checkable
class PatternPicture(Protocol):
    def pattern_mask(self, L: int) -> Tensor: ...


@runtime_checkable
class TargetLosses(Protocol):
    def target_losses(self, aux, y_BL: Tensor, readout, chunk: int) -> dict[str, Tensor]: ...


@dataclass
class Hooks:
    """The model's modules that implement each hook, in module order (layer order)."""

    after_step: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    head_stats: list = field(default_factory=list)
    patterns: list = field(default_factory=list)
    profiles: list = field(default_factory=list)
    target_losses: list = field(default_factory=list)

    @classmethod
    def collect(cls, model: nn.Module) -> "Hooks":
        mods = [m for m in model.modules() if m is not model]
        return cls(after_step=[m for m in mods if isinstance(m, AfterOptimizerStep)],
                   losses=[m for m in mods if isinstance(m, ParameterLosses)],
                   head_stats=[m for m in mods if isinstance(m, HeadStatistics)],
                   patterns=[m for m in mods if isinstance(m, PatternPicture)],
                   profiles=[m for m in mods if isinstance(m, DistanceProfile)],
                   target_losses=[m for m in mods if isinstance(m, TargetLosses)])
