"""Feed-forward sublayers: one axis of the decoder, keyed by `model.ffn.kind`.

  * mlp    - up-projection to `model.d_ff`, an activation, down-projection (GPT-2, with
             GELU by default; `activation` picks another).
  * swiglu - the SiLU-gated linear unit of Shazeer (2020), "GLU Variants Improve
             Transformer": down(silu(x W_gate) * (x W_up)), as in PaLM and LLaMA. It has
             three d_model x d_ff matrices instead of two; d_ff = 8/3 d_model keeps the
             parameter count of a 4 d_model MLP.

Shapes: B batch, L length, M model dim, F d_ff.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch.nn.functional as F
from torch import Tensor, nn

from lmtrain.model.init import ResidualOut
from lmtrain.registry import KindConfig, Registry, Variant

FFN: Registry[type["FeedForward"]] = Registry("model.ffn")

ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": partial(F.gelu, approximate="tanh"), "relu": F.relu, "silu": F.silu}


@dataclass
class FFNConfig(KindConfig):
    kind: str = "mlp"


class FeedForward(Variant, nn.Module):
    Config = FFNConfig

    def __init__(self, cfg: FFNConfig, *, d_model: int, d_ff: int, bias: bool):
        super().__init__()
        self.cfg = cfg


@dataclass
class MLPConfig(FFNConfig):
    kind: str = "mlp"
    activation: str = "gelu"  # gelu (exact) | gelu_tanh | relu | silu


@FFN.register("mlp")
class MLP(FeedForward):
    Config = MLPConfig
    test_options = {"activation": "silu"}

    def __init__(self, cfg: MLPConfig, *, d_model: int, d_ff: int, bias: bool):
        super().__init__(cfg, d_model=d_model, d_ff=d_ff, bias=bias)
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.down = ResidualOut(d_ff, d_model, bias=bias)
        self.act = ACTIVATIONS[cfg.activation]

    @classmethod
    def own_parameters(cls, a) -> int:
        m = a.model
        return 2 * m.d_model * m.d_ff + ((m.d_ff + m.d_model) if m.bias else 0)

    @classmethod
    def check(cls, a) -> list[str]:
        act = a.model.ffn.activation
        if act not in ACTIVATIONS:
            return [f"model.ffn.activation={act!r}: choose one of {', '.join(ACTIVATIONS)}"]
        return []

    def forward(self, x_BLM: Tensor) -> Tensor:
        return self.down(self.act(self.up(x_BLM)))


@FFN.register("swiglu")
class SwiGLU(FeedForward):
    def __init__(self, cfg: FFNConfig, *, d_model: int, d_ff: int, bias: bool):
        super().__init__(cfg, d_model=d_model, d_ff=d_ff, bias=bias)
        self.up = nn.Linear(d_model, 2 * d_ff, bias=bias)  # the gate's and the value's projections, fused
        self.down = ResidualOut(d_ff, d_model, bias=bias)

    @classmethod
    def own_parameters(cls, a) -> int:
        m = a.model
        return 3 * m.d_model * m.d_ff + ((2 * m.d_ff + m.d_model) if m.bias else 0)

    def forward(self, x_BLM: Tensor) -> Tensor:
        gate_BLF, value_BLF = self.up(x_BLM).chunk(2, dim=-1)
        return self.down(F.silu(gate_BLF) * value_BLF)
