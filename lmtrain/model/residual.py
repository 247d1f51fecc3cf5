"""Residual wiring: one axis of the decoder, keyed by `model.residual.kind`.

A wiring runs a sequence of layers (each offering sublayers f and g, and their parameters)
over the stream. It sees the whole sequence, so stack-level schemes (two-stream reversible
layers with their own autograd function) fit the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lmtrain.model.layer import Context, Layer, gather_rows
from lmtrain.registry import KindConfig, Registry, Variant

RESIDUAL: Registry[type["Residual"]] = Registry("model.residual")


@dataclass
class ResidualConfig(KindConfig):
    kind: str = "prenorm"


class Residual(Variant):
    Config = ResidualConfig
    # Recompute each layer in the backward pass instead of keeping its activations
    # (trainer.activation_checkpointing). Wirings that never keep activations ignore it.
    checkpoint_layers: bool = False
    # run_rows is implemented: one layer's output at a subset of positions (ACT's running ones).
    supports_rows: bool = False
    # Its backward takes gradients of whole parameters outside their module's forward, which
    # sharded parameters (ZeRO-3) do not allow.
    needs_whole_parameters: bool = False
    # A split sequence (trainer.sequence_parallel) runs through it: its backward does not rerun
    # layers (whose attention exchanges activations with the other processes) on its own.
    splits_sequence: bool = True

    def __init__(self, cfg: ResidualConfig):
        self.cfg = cfg

    def run(self, layers: Sequence[Layer], x_BLM: Tensor, ctx: Context) -> Tensor:
        raise NotImplementedError

    def run_rows(self, layer: Layer, x_BLM: Tensor, rows_BQ: Tensor, ctx: Context) -> Tensor:
        """The layer's output at the positions `rows_BQ` (B x Q x M); the other positions
        still serve as keys and values."""
        raise NotImplementedError


@RESIDUAL.register("prenorm")
class PreNorm(Residual):
    """x <- x + F(x); x <- x + G(x), with each sublayer normalising its own input."""

    supports_rows = True

    def run(self, layers, x_BLM, ctx):
        for layer in layers:
            if self.checkpoint_layers and torch.is_grad_enabled():
                # Non-reentrant: every tensor saved inside (aux losses too) is rebuilt in
                # backward, with the RNG state (dropout) replayed.
                x_BLM = checkpoint(self.block, layer, x_BLM, ctx, use_reentrant=False)
            else:
                x_BLM = self.block(layer, x_BLM, ctx)
        return x_BLM

    @staticmethod
    def block(layer, x_BLM, ctx):
        x_BLM = x_BLM + layer.f(x_BLM, ctx)
        return x_BLM + layer.g(x_BLM, ctx)

    def run_rows(self, layer, x_BLM, rows_BQ, ctx):
        if self.checkpoint_layers and torch.is_grad_enabled():
            return checkpoint(self.block_rows, layer, x_BLM, rows_BQ, ctx, use_reentrant=False)
        return self.block_rows(layer, x_BLM, rows_BQ, ctx)

    @staticmethod
    def block_rows(layer, x_BLM, rows_BQ, ctx):
        y_BQM = gather_rows(x_BLM, rows_BQ) + layer.f(x_BLM, ctx, rows_BQ=rows_BQ)
        return y_BQM + layer.g(y_BQM, ctx)


# The other wirings register themselves on import.
from lmtrain.model import reversible  # noqa: E402,F401
