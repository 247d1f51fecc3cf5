"""Sliding-window causal attention (key j visible to query i iff 0 <= i - j < W) from two
flash-attention calls over chunks of W queries (CPU).

Chunk c holds queries cW .. cW + W - 1. Query cW + a (0 <= a < W) sees
  * in its own chunk, keys cW + b with b <= a: plain causal attention within the chunk (A,
    `is_causal=True`, no mask);
  * in the previous chunk, keys (c - 1)W + b with b > a (distance W + a - b < W): the same
    W x W strictly upper-triangular mask for every chunk (B; the last row sees nothing there).
The two parts are merged exactly by their log-sum-exps. In backward, flash attention's
backward kernel runs on each part with the merged output and log-sum-exp, which is exactly
each part's share of the gradient (the rule ring attention uses), and the shares are summed.

Chunks are laid out (B H) x n x W x D, a view of q, k and v whose chunk slices are views too,
and every call is torch's fused CPU kernel on sequences of W: time O(L W) at the kernel's
speed, no gather, no copy of the inputs, and no buffer larger than them. Uses the kernel's private ops
(`aten._scaled_dot_product_flash_attention_for_cpu` and its backward, torch >= 2.2);
`available()` says whether this torch has them. Dropout: none.

Shapes: B batch, H heads, n chunks, W window, D head dim; inputs B H L D with L = n W (the
kernels read the chunk index as their head dimension).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _ops():
    aten = torch.ops.aten
    return aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention_for_cpu_backward


def available() -> bool:
    try:
        _ops()
    except (AttributeError, RuntimeError):
        return False
    return True


def _upper_mask(W: int, like: Tensor) -> Tensor:
    """Part B's additive mask: key b visible to query a iff b > a."""
    visible = torch.ones(W, W, dtype=torch.bool, device=like.device).triu(1)
    return torch.zeros(W, W, dtype=like.dtype, device=like.device).masked_fill(~visible, float("-inf"))


PIECE_BYTES = 4 << 20  # chunks are processed in pieces of about this many bytes of q


def _pieces(q4: Tensor) -> list[tuple[int, int]]:
    BH, n, W, D = q4.shape
    per = max(1, PIECE_BYTES // (BH * W * D * q4.element_size()))
    return [(c0, min(n, c0 + per)) for c0 in range(0, n, per)]


def band_forward(q4: Tensor, k4: Tensor, v4: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor | None]:
    """Chunks (B H) x n x W x D -> (out, lse, part B's mask): the window's attention and its
    log-sum-exp per query (float32, float64 for float64 inputs)."""
    fwd, _ = _ops()
    BH, n, W, D = q4.shape
    out = q4.new_empty(BH, n, W, D)
    lse = q4.new_empty(BH, n, W, dtype=torch.float32 if q4.dtype != torch.float64 else q4.dtype)
    mask = _upper_mask(W, q4) if n > 1 else None
    # In pieces: every temporary stays small (reused by the allocator, in cache); the results
    # are written once into `out` and `lse`.
    for c0, c1 in _pieces(q4):
        o, lse_p = fwd(q4[:, c0:c1], k4[:, c0:c1], v4[:, c0:c1], 0.0, True, scale=scale)
        s0 = max(c0, 1)
        if s0 < c1:
            o_b, l_b = fwd(q4[:, s0:c1], k4[:, s0 - 1 : c1 - 1], v4[:, s0 - 1 : c1 - 1], 0.0, False,
                           attn_mask=mask, scale=scale)
            l_b[..., W - 1] = float("-inf")  # the last row sees no key of the previous chunk
            l_a = lse_p[:, s0 - c0 :]
            merged = torch.logaddexp(l_a, l_b)
            o[:, s0 - c0 :].mul_(torch.exp(l_a - merged)[..., None]).add_(
                o_b.mul_(torch.exp(l_b - merged)[..., None]))
            lse_p[:, s0 - c0 :] = merged
        out[:, c0:c1] = o
        lse[:, c0:c1] = lse_p
    return out, lse, mask


def band_backward(g4: Tensor, q4: Tensor, k4: Tensor, v4: Tensor, out: Tensor, lse: Tensor, mask: Tensor | None,
                  scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The window's share of the gradients, given the output and log-sum-exp of the whole
    attention (the window's own, or a merge of the window with other keys)."""
    _, bwd = _ops()
    BH, n, W, D = q4.shape
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q4, k4, v4))
    for c0, c1 in _pieces(q4):  # in order: each piece's part A sets its chunks before part B adds
        sl = slice(c0, c1)
        dq[:, sl], dk[:, sl], dv[:, sl] = bwd(g4[:, sl], q4[:, sl], k4[:, sl], v4[:, sl], out[:, sl], lse[:, sl],
                                              0.0, True, scale=scale)
        s0 = max(c0, 1)
        if s0 < c1:
            prev = slice(s0 - 1, c1 - 1)
            dq_b, dk_b, dv_b = bwd(g4[:, s0:c1], q4[:, s0:c1], k4[:, prev], v4[:, prev], out[:, s0:c1],
                                   lse[:, s0:c1], 0.0, False, attn_mask=mask, scale=scale)
            dq[:, s0:c1] += dq_b
            dk[:, prev] += dk_b
            dv[:, prev] += dv_b
    return dq, dk, dv


class _SlidingWindow(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, window: int, scale: float) -> Tensor:
        B, H, L, D = q.shape
        W, n = window, L // window
        # (B H) n W D: a view of contiguous inputs, whose chunk slices are views too.
        q4, k4, v4 = (t.reshape(B * H, n, W, D) for t in (q, k, v))
        out, lse, mask = band_forward(q4, k4, v4, scale)
        ctx.save_for_backward(q4, k4, v4, out, lse, *(() if mask is None else (mask,)))
        ctx.scale = scale
        return out.view(B, H, L, D)

    @staticmethod
    def backward(ctx, grad: Tensor):
        q4, k4, v4, out, lse, *mask = ctx.saved_tensors
        g4 = grad.reshape(q4.shape)
        dq, dk, dv = band_backward(g4, q4, k4, v4, out, lse, mask[0] if mask else None, ctx.scale)
        shape = grad.shape
        return dq.view(shape), dk.view(shape), dv.view(shape), None, None


def sliding_window_attention(q_BHLD: Tensor, k_BHLD: Tensor, v_BHLD: Tensor, window: int, scale: float) -> Tensor:
    """Causal attention over the last `window` keys of each query (aligned q, k, v). The length
    is padded to a multiple of the window (padded keys come after every real query)."""
    B, H, L, D = q_BHLD.shape
    W = min(window, L)
    if W < 2:
        raise ValueError("sliding_window_attention needs a window of at least 2 (1: each query sees itself)")
    pad = -L % W
    if pad:
        q_BHLD, k_BHLD, v_BHLD = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q_BHLD, k_BHLD, v_BHLD))
    out = _SlidingWindow.apply(q_BHLD, k_BHLD, v_BHLD, W, scale)
    return out[:, :, :L] if pad else out
