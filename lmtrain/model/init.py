"""Parameter initialisation: a generic pass by module type, then each variant's own.

The decoder initialises by module type only (GPT-2, Radford et al. 2019): every `nn.Linear`
and `nn.Embedding` weight from N(0, std), linear biases 0, norms at their defaults, and the
weights of `ResidualOut` layers (the projections whose output joins the residual stream)
scaled by 1/sqrt(2 x layer applications). Parameters a variant holds directly (a kernel's
per-head spans or scales, a gate's bias) are never touched by that pass: every module that
defines `init_parameters()` sets its own afterwards, from its own config.
"""

from __future__ import annotations

import math

from torch import nn


class ResidualOut(nn.Linear):
    """A linear layer whose output is added to the residual stream (attention and feed-forward
    output projections); its initial weights are scaled down with depth."""


NORMS = (nn.LayerNorm, nn.RMSNorm)


def init_by_type(model: nn.Module, std: float, layer_applications: int) -> None:
    """The generic pass, in module order (which fixes the random stream: a model built twice
    from the same seed gets the same weights)."""
    scale = 1.0 / math.sqrt(2 * layer_applications)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std * (scale if isinstance(m, ResidualOut) else 1.0))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        elif isinstance(m, NORMS):
            m.reset_parameters()


def init_variants(model: nn.Module) -> None:
    """Each module's own initialisation (`init_parameters()`), after the generic pass."""
    for m in model.modules():
        if m is not model and callable(getattr(m, "init_parameters", None)):
            m.init_parameters()
