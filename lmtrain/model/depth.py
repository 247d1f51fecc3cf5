"""Depth control: one axis of the decoder, keyed by `model.depth.kind`.

A depth module owns the layers and decides how often and in which order they run;
the residual wiring decides how each run combines with the stream. `fixed` is the
ordinary stack of `model.n_layers` distinct layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from lmtrain.model.layer import Context, Layer
from lmtrain.model.residual import Residual
from lmtrain.registry import KindConfig, Registry, Variant

DEPTH: Registry[type["Depth"]] = Registry("model.depth.kind")


@dataclass
class DepthConfig(KindConfig):
    kind: str = "fixed"


class Depth(Variant, nn.Module):
    Config = DepthConfig


@DEPTH.register("fixed")
class FixedDepth(Depth):
    def __init__(self, model_cfg, residual: Residual):
        super().__init__()
        self.layers = nn.ModuleList(Layer(model_cfg, i) for i in range(model_cfg.n_layers))
        self.residual = residual

    def forward(self, x_BLM: Tensor, ctx: Context) -> Tensor:
        return self.residual.run(self.layers, x_BLM, ctx)
