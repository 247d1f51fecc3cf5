"""Depth control: one axis of the decoder, keyed by `model.depth.kind`.

A depth module owns the layers and decides how often and in which order they run;
the residual wiring decides how each run combines with the stream. Through `ctx.readout`
a depth module can apply the decoder's final norm and LM head to any intermediate state
(exit confidences, per-exit losses).

  * fixed     - the ordinary stack of `model.n_layers` distinct layers.
  * universal - those layers as one shared block, applied `steps` times
                (lmtrain/model/universal.py).
  * act       - the shared block with per-position ACT halting, up to `max_steps`.
  * early_exit - the stack with an exit after every layer (or the `exits`): per-exit losses,
                halting units, per-token confident exits (lmtrain/model/early_exit.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Iterator, Optional

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
    # True: every layer runs exactly once per forward, in order (a plain stack). Wirings that
    # rebuild a layer's inputs from its outputs (reversible) need it.
    runs_layers_once: ClassVar[bool] = False
    # The per-token statistic (`Aux.tokens`) that `generate --show-token-stats` marks.
    primary_token_stat: ClassVar[Optional[str]] = None
    # Every position takes the same path through the layers, so a sequence can be split across
    # processes (trainer.sequence_parallel); per-token depth (halting, exits) cannot yet.
    splits_sequence: ClassVar[bool] = False

    @classmethod
    def layer_applications(cls, model_cfg) -> int:
        """How many layer applications one forward pass runs at most: the model's effective
        depth (FLOPs, activation memory, the 1/sqrt(2 depth) init of residual projections)."""
        return model_cfg.n_layers

    @contextmanager
    def full_depth(self) -> Iterator[None]:
        """Every position runs every layer inside this block (a kind with per-token exits
        suspends them: the trainer's validation loss is the full model's)."""
        yield

    @classmethod
    def extra_readouts(cls, model_cfg) -> int:
        """LM-head applications per token in training beyond the final one (early exit: the
        trained intermediate exits), for FLOPs and MFU."""
        return 0

    def token_stat_limits(self) -> dict[str, float]:
        """The largest value each per-token statistic (`Aux.tokens`) can take."""
        return {}



@DEPTH.register("fixed")
class FixedDepth(Depth):
    splits_sequence = True
    runs_layers_once = True

    def __init__(self, model_cfg, residual: Residual):
        super().__init__()
        self.layers = nn.ModuleList(Layer(model_cfg, i) for i in range(model_cfg.n_layers))
        self.residual = residual

    def forward(self, x_BLM: Tensor, ctx: Context) -> Tensor:
        return self.residual.run(self.layers, x_BLM, ctx)


# The other kinds register themselves on import.
from lmtrain.model import early_exit, universal  # noqa: E402,F401
