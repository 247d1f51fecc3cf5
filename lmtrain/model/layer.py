"""One decoder layer as two sublayers, F (attention) and G (feed-forward).

The residual wiring (lmtrain/model/residual.py) decides how F and G combine with the
stream, so the same layer serves pre-norm wiring today and two-stream reversible wiring
later. Shapes: B batch, L length, M model dim, H heads, D head dim, F d_ff.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Optional

import torch
from torch import Tensor, nn

from lmtrain.model.attention import build_attention
from lmtrain.model.outputs import Aux
from lmtrain.model.positions import Position


@dataclass
class KVCache:
    """Keys and values of past positions, one entry per attention call site."""

    entries: dict = field(default_factory=dict)
    length: int = 0  # positions already cached

    def extend(self, key: Hashable, k_BHLD: Tensor, v_BHLD: Tensor, pos_L: Tensor):
        if key in self.entries:
            k0, v0, p0 = self.entries[key]
            k_BHLD, v_BHLD, pos_L = torch.cat((k0, k_BHLD), 2), torch.cat((v0, v_BHLD), 2), torch.cat((p0, pos_L))
        self.entries[key] = (k_BHLD, v_BHLD, pos_L)
        return k_BHLD, v_BHLD, pos_L


@dataclass
class Context:
    """Per-forward state shared by all layers (no module state is mutated)."""

    pos_L: Tensor
    position: Position
    aux: Aux
    cache: Optional[KVCache] = None


def make_norm(kind: str, d_model: int, bias: bool) -> nn.Module:
    if kind == "rmsnorm":
        return nn.RMSNorm(d_model)
    return nn.LayerNorm(d_model, bias=bias)


class SelfAttention(nn.Module):
    def __init__(self, cfg, index: int):
        super().__init__()
        self.n_heads, self.index = cfg.n_heads, index
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.kernel = build_attention(cfg.attention, d_model=cfg.d_model, n_heads=cfg.n_heads, dropout=cfg.dropout)
        self.kernel.layer_index = index

    def forward(self, x_BLM: Tensor, ctx: Context, key: Hashable) -> Tensor:
        B, L, M = x_BLM.shape
        q, k, v = self.qkv(x_BLM).view(B, L, 3, self.n_heads, M // self.n_heads).permute(2, 0, 3, 1, 4)  # 3 B H L D
        q, k = ctx.position.rotate(q, ctx.pos_L), ctx.position.rotate(k, ctx.pos_L)
        k_pos = ctx.pos_L
        if ctx.cache is not None:
            k, v, k_pos = ctx.cache.extend(key, k, v, ctx.pos_L)
        o_BHLD = self.kernel(q, k, v, position=ctx.position, q_pos_L=ctx.pos_L, k_pos_S=k_pos, aux=ctx.aux)
        return self.proj(o_BHLD.transpose(1, 2).reshape(B, L, M))


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x_BLM: Tensor) -> Tensor:
        return self.down(nn.functional.gelu(self.up(x_BLM)))


class Layer(nn.Module):
    def __init__(self, cfg, index: int):
        super().__init__()
        self.index = index
        self.attn_norm = make_norm(cfg.norm, cfg.d_model, cfg.bias)
        self.attn = SelfAttention(cfg, index)
        self.ffn_norm = make_norm(cfg.norm, cfg.d_model, cfg.bias)
        self.ffn = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def f(self, x_BLM: Tensor, ctx: Context, key: Hashable = None) -> Tensor:
        """Attention sublayer (its own norm and dropout); key names its KV-cache slot."""
        return self.drop(self.attn(self.attn_norm(x_BLM), ctx, self.index if key is None else key))

    def g(self, x_BLM: Tensor, ctx: Context) -> Tensor:
        """Feed-forward sublayer (its own norm and dropout)."""
        return self.drop(self.ffn(self.ffn_norm(x_BLM)))
