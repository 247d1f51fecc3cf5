"""Causal linear attention: the computation shared by the kernelized kinds (performer, rfa, linear).

A kernelized kind maps queries and keys to features fq_i, fk_j (M of them) and, optionally,
a cumulative log-decay G (non-increasing along the sequence). Query i then attends to key
j <= i with the weight

    w_ij = (fq_i . fk_j) * exp(G_i - G_j)

and the output is  out_i = sum_j w_ij v_j / sum_j w_ij.  The decay carries RFA's gate
(G = cumsum log g) and FAVOR+'s causal stabiliser (G = -running max of the key exponents,
a per-query constant that cancels in the ratio); without one, G = 0.

Three implementations of (numerator, denominator), all with the same meaning:
  * `quadratic`  - the masked L x S form; the reference, and the path for a KV cache.
  * `chunked`    - quadratic inside chunks of C positions, with the prefix state
                   S = sum_j exp(G_end - G_j) fk_j v_j^T (M x D, plus M for the
                   denominator) carried between chunks. Time O(L (C + D) M), memory
                   O(L M + L C + (L / C) M D). The CPU path, and the reference of the Triton one.
  * Triton       - lmtrain/model/attention/triton_linear.py, the same algorithm fused on GPU.

Every exponent taken is <= 0 (G is non-increasing and only G_i - G_j with j <= i is
exponentiated), so nothing overflows however long the sequence.
Shapes: B batch, H heads, L queries, S keys, M features, D head dim, n chunks, C chunk.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def quadratic(fq_BHLM: Tensor, fk_BHSM: Tensor, v_BHSD: Tensor, g_BHL: Optional[Tensor], g_BHS: Optional[Tensor],
              visible_LS: Tensor) -> tuple[Tensor, Tensor]:
    """Numerator B H L D and denominator B H L over the keys `visible_LS` lets each query see."""
    w_BHLS = fq_BHLM @ fk_BHSM.transpose(-1, -2)
    if g_BHL is not None:
        expo = (g_BHL[..., :, None] - g_BHS[..., None, :]).masked_fill(~visible_LS, float("-inf"))
        w_BHLS = w_BHLS * expo.exp()
    w_BHLS = w_BHLS.masked_fill(~visible_LS, 0.0)
    return w_BHLS @ v_BHSD, w_BHLS.sum(-1)


def chunked(fq_BHLM: Tensor, fk_BHLM: Tensor, v_BHLD: Tensor, g_BHL: Optional[Tensor], chunk: int
            ) -> tuple[Tensor, Tensor]:
    """Aligned causal attention (query i and key i are the same position), in chunks."""
    B, H, L, M = fq_BHLM.shape
    D = v_BHLD.shape[-1]
    C = min(chunk, L)
    n = -(-L // C)
    pad = n * C - L
    # The denominator is the numerator of a column of ones: one matmul computes both.
    v1_BHLE = torch.cat((v_BHLD, v_BHLD.new_ones(B, H, L, 1)), dim=-1)
    q = F.pad(fq_BHLM, (0, 0, 0, pad)).view(B, H, n, C, M)
    k = F.pad(fk_BHLM, (0, 0, 0, pad)).view(B, H, n, C, M)  # padded keys are 0: they add nothing
    v = F.pad(v1_BHLE, (0, 0, 0, pad)).view(B, H, n, C, D + 1)
    causal_CC = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    scores = q @ k.transpose(-1, -2)  # B H n C C
    if g_BHL is None:
        intra = scores.masked_fill(~causal_CC, 0.0) @ v
        T = k.transpose(-1, -2) @ v  # per-chunk states, B H n M E
        prefix = T.cumsum(2) - T  # state before each chunk (exclusive prefix sum)
        inter = q @ prefix
    else:
        g = F.pad(g_BHL, (0, pad), mode="replicate").view(B, H, n, C)
        g_end = g[..., -1]  # B H n: G at each chunk's last position
        g_before = F.pad(g_end[..., :-1], (1, 0), value=0.0)  # G at the end of the previous chunk
        g_before[..., 0] = g[..., 0, 0]  # chunk 0 has no prefix; any finite reference does
        expo = (g[..., :, None] - g[..., None, :]).masked_fill(~causal_CC, float("-inf"))
        intra = (scores * expo.exp()) @ v
        T = (k * (g_end[..., None] - g).exp()[..., None]).transpose(-1, -2) @ v  # referenced to g_end
        decay = (g_end - g_before).exp()  # B H n: how the carried state fades across chunk c
        states, state = [], torch.zeros_like(T[:, :, 0])
        for c in range(n):
            states.append(state)
            state = state * decay[..., c, None, None] + T[:, :, c]
        prefix = torch.stack(states, dim=2)  # B H n M E, referenced to g_before
        inter = (q * (g - g_before[..., None]).exp()[..., None]) @ prefix
    out = (intra + inter).view(B, H, n * C, D + 1)[:, :, :L]
    return out[..., :D], out[..., D]
