"""One decoder layer as two sublayers, F (attention) and G (feed-forward).

The residual wiring (lmtrain/model/residual.py) decides how F and G combine with the
stream, so the same layer serves pre-norm wiring today and two-stream reversible wiring
later. Shapes: B batch, L length, M model dim, H heads, D head dim, F d_ff.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Optional

import torch
import torch.nn.functional as F
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

    def repeat_last(self, src: Hashable, dst: Hashable, n: int) -> None:
        """Append to slot `dst` the last `n` positions of slot `src` (ACT: a position that has
        halted offers the same keys and values at every later step)."""
        k, v, pos = self.entries[src]
        self.extend(dst, k[:, :, -n:], v[:, :, -n:], pos[-n:])


@dataclass
class Context:
    """Per-forward state shared by all layers (no module state is mutated)."""

    pos_L: Tensor
    position: Position
    aux: Aux
    cache: Optional[KVCache] = None
    step: int = 0  # which application of shared layers this is (Universal Transformer); names cache slots


def gather_rows(x_BLM: Tensor, rows_BQ: Tensor) -> Tensor:
    """x at the positions `rows_BQ` of each row: B x Q x M."""
    return x_BLM.gather(1, rows_BQ[..., None].expand(-1, -1, x_BLM.shape[-1]))


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

    def forward(self, x_BLM: Tensor, ctx: Context, key: Hashable, rows_BQ: Optional[Tensor] = None) -> Tensor:
        """B x L x M, or B x Q x M for the query positions `rows_BQ` (keys and values always
        come from all L positions)."""
        B, L, M = x_BLM.shape
        H, D = self.n_heads, M // self.n_heads
        q_pos = ctx.pos_L
        if rows_BQ is not None and self.kernel.supports_query_rows:
            # Only the asked-for queries are projected and attended; keys and values of all.
            w_q, w_kv = self.qkv.weight.split((M, 2 * M))
            b_q, b_kv = self.qkv.bias.split((M, 2 * M)) if self.qkv.bias is not None else (None, None)
            q = F.linear(gather_rows(x_BLM, rows_BQ), w_q, b_q).view(B, -1, H, D).transpose(1, 2)  # B H Q D
            k, v = F.linear(x_BLM, w_kv, b_kv).view(B, L, 2, H, D).permute(2, 0, 3, 1, 4)  # 2 B H L D
            q_pos = ctx.pos_L[rows_BQ]  # B Q
        else:
            q, k, v = self.qkv(x_BLM).view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)  # 3 B H L D
        q, k = ctx.position.rotate(q, q_pos), ctx.position.rotate(k, ctx.pos_L)
        k_pos = ctx.pos_L
        if ctx.cache is not None:
            k, v, k_pos = ctx.cache.extend(key, k, v, ctx.pos_L)
        o_BHLD = self.kernel(q, k, v, position=ctx.position, q_pos_L=q_pos, k_pos_S=k_pos, aux=ctx.aux)
        o_BLM = o_BHLD.transpose(1, 2).reshape(B, -1, M)
        if rows_BQ is not None and not self.kernel.supports_query_rows:
            o_BLM = gather_rows(o_BLM, rows_BQ)  # every query was attended; project the asked-for ones
        return self.proj(o_BLM)


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

    def f(self, x_BLM: Tensor, ctx: Context, key: Hashable = None, rows_BQ: Optional[Tensor] = None) -> Tensor:
        """Attention sublayer (its own norm and dropout); key names its KV-cache slot. With
        `rows_BQ`, the output at those positions only (B x Q x M), attending over all."""
        key = (ctx.step, self.index) if key is None else key
        return self.drop(self.attn(self.attn_norm(x_BLM), ctx, key, rows_BQ))

    def g(self, x_BLM: Tensor, ctx: Context) -> Tensor:
        """Feed-forward sublayer (its own norm and dropout)."""
        return self.drop(self.ffn(self.ffn_norm(x_BLM)))
