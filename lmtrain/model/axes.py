"""The decoder's axes, and an assembly of one choice per axis.

    model.position.kind    positional scheme     lmtrain/model/positions.py   POSITIONS
    model.attention.kind   attention kernel      lmtrain/model/attention/     ATTENTION
    model.ffn.kind         feed-forward          lmtrain/model/ffn.py         FFN
    model.residual.kind    residual wiring       lmtrain/model/residual.py    RESIDUAL
    model.depth.kind       depth control         lmtrain/model/depth.py       DEPTH

An `Assembly` holds the model config and the class chosen on every axis. Each variant's
`check(assembly)` reads the other axes through it, by what they declare (a scheme's
`has_score_bias`, a kernel's capabilities, a depth's `runs_layers_once`), never by their kind
names. The config loader asks every axis before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmtrain.model.attention import ATTENTION
from lmtrain.model.depth import DEPTH
from lmtrain.model.ffn import FFN
from lmtrain.model.positions import POSITIONS
from lmtrain.model.residual import RESIDUAL
from lmtrain.registry import Registry

# axis name -> registry, in the order the loader checks them (and the decoder builds them)
AXES: dict[str, Registry] = {"position": POSITIONS, "attention": ATTENTION, "ffn": FFN, "residual": RESIDUAL,
                             "depth": DEPTH}


@dataclass(frozen=True)
class Assembly:
    model: Any  # lmtrain.config.ModelConfig
    seq_len: int  # the training length (data.seq_len): tables sized by it are checked against it
    position: type
    attention: type
    ffn: type
    residual: type
    depth: type

    @classmethod
    def of(cls, model_cfg, seq_len: int) -> "Assembly":
        chosen = {axis: reg.get(getattr(model_cfg, axis).kind) for axis, reg in AXES.items()}
        return cls(model=model_cfg, seq_len=seq_len, **chosen)

    def variants(self) -> dict[str, type]:
        return {axis: getattr(self, axis) for axis in AXES}

    def check(self) -> list[str]:
        """Every axis's reasons to refuse this assembly, in axis order."""
        return [reason for variant in self.variants().values() for reason in variant.check(self)]
