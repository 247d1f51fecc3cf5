"""FlexAttention plumbing shared by the kernels that use it: the (compiled) function and
cached causal block masks, optionally limited to a band of recent keys."""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=32)
def causal_block_mask(q_len: int, kv_len: int, device: str, window: int | None = None):
    """Key j visible to query i iff j <= i (and i - j < window, when a window is given)."""
    from torch.nn.attention.flex_attention import create_block_mask

    if window is None:
        def mask(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx
    else:
        def mask(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    return create_block_mask(mask, None, None, q_len, kv_len, device=device)


@lru_cache(maxsize=1)
def flex_fn(compiled: bool):
    """flex_attention, compiled (GPU) or eager (the CPU tests)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
