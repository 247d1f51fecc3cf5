"""Attention kernels, one file each, registered by `model.attention.kind`."""

from lmtrain.model.attention.base import (
    ATTENTION,
    AttentionConfig,
    AttentionInputs,
    AttentionKernel,
    Capabilities,
    Tolerance,
    decide,
    kept_decisions,
    reference_paths,
)

# Each import registers one kind.
from lmtrain.model.attention import softmax, adaptive_span, performer, rfa, linear, sparse, distance_aware, lsh, lowrank  # noqa: E402,F401  isort: skip

__all__ = ["ATTENTION", "AttentionConfig", "AttentionInputs", "AttentionKernel", "Capabilities", "Tolerance",
           "build_attention", "decide", "kept_decisions", "reference_paths"]


def build_attention(cfg: AttentionConfig, *, d_model: int, n_heads: int, dropout: float,
                    layer: int = 0) -> AttentionKernel:
    return ATTENTION.get(cfg.kind)(cfg, d_model=d_model, n_heads=n_heads, dropout=dropout, layer=layer)
