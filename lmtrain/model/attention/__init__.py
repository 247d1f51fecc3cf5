"""Attention kernels, one file each, registered by `model.attention.kind`."""

from lmtrain.model.attention.base import ATTENTION, AttentionConfig, AttentionKernel
from lmtrain.model.attention import adaptive_span as _adaptive_span  # noqa: F401  (registers "adaptive_span")
from lmtrain.model.attention import softmax as _softmax  # noqa: F401  (registers "softmax")
from lmtrain.model.attention import performer as _performer  # noqa: F401  (registers "performer")
from lmtrain.model.attention import rfa as _rfa  # noqa: F401  (registers "rfa")
from lmtrain.model.attention import linear as _linear  # noqa: F401  (registers "linear")

__all__ = ["ATTENTION", "AttentionConfig", "AttentionKernel", "build_attention"]


def build_attention(cfg: AttentionConfig, *, d_model: int, n_heads: int, dropout: float) -> AttentionKernel:
    return ATTENTION.get(cfg.kind)(cfg, d_model=d_model, n_heads=n_heads, dropout=dropout)
