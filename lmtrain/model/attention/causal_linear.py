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


# Positions per segment: the sequence is processed in segments of whole chunks, carrying the
# state between them, so that each operation's working set (B x H x segment x M floats) stays
# near this many elements, in cache, whatever L is; time then grows linearly in L.
SEGMENT_ELEMENTS = 1 << 20


def segment_length(B: int, H: int, M: int, D: int, chunk: int) -> int:
    """Positions per segment (whole chunks) that keep B x H x segment x max(M, D + 1) near
    SEGMENT_ELEMENTS."""
    return max(1, SEGMENT_ELEMENTS // (B * H * max(M, D + 1) * chunk)) * chunk


def with_ones(v_BHLD: Tensor) -> Tensor:
    """v with a column of ones: the denominator is the numerator of that column, so one matmul
    computes both."""
    return torch.cat((v_BHLD, v_BHLD.new_ones(*v_BHLD.shape[:-1], 1)), dim=-1)


def chunked(fq_BHLM: Tensor, fk_BHLM: Tensor, v_BHLD: Tensor, g_BHL: Optional[Tensor], chunk: int,
            segment: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Aligned causal attention (query i and key i are the same position), in chunks, in
    segments of whole chunks (default `segment_length`) with the state carried between them."""
    B, H, L, M = fq_BHLM.shape
    C = min(chunk, L)
    segment = max(C, (segment or segment_length(B, H, M, v_BHLD.shape[-1], C)) // C * C)
    # split, not slices: backward then assembles each input's gradient once, instead of a
    # zero-filled full-length tensor per segment.
    pieces = [t.split(segment, dim=2) for t in (fq_BHLM, fk_BHLM, with_ones(v_BHLD))]
    gs = [None] * len(pieces[0]) if g_BHL is None else g_BHL.split(segment, dim=-1)
    state, g_prev, outs = None, None, []
    for q, k, v, g in zip(*pieces, gs):
        out, state, g_prev = segment_forward(q, k, v, g, C, state, g_prev)
        outs.append(out)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out[..., :-1], out[..., -1]


def segment_forward(fq_BHLM: Tensor, fk_BHLM: Tensor, v_BHLE: Tensor, g_BHL: Optional[Tensor], C: int,
             state_BHME: Optional[Tensor], g_prev_BH: Optional[Tensor]):
    """One segment of whole chunks (v with its column of ones, `with_ones`), given the state
    carried in (None: the sequence starts here), referenced to G at the position before the
    segment (`g_prev_BH`). Returns (the output, with the denominator as its last column, the
    state after the segment, and G at its last position)."""
    B, H, L, M = fq_BHLM.shape
    E = v_BHLE.shape[-1]
    C = min(C, L)
    n = -(-L // C)
    pad = n * C - L

    def blocks(t):  # B H L X -> B H n C X, padding with zeros (padded keys add nothing)
        return (F.pad(t, (0, 0, 0, pad)) if pad else t).reshape(B, H, n, C, t.shape[-1])

    q, k, v = blocks(fq_BHLM), blocks(fk_BHLM), blocks(v_BHLE)
    causal_CC = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    scores = q @ k.transpose(-1, -2)  # B H n C C
    if g_BHL is None:
        intra = scores.masked_fill(~causal_CC, 0.0) @ v
        T = k.transpose(-1, -2) @ v  # per-chunk states, B H n M E
        cum = T.cumsum(2)
        prefix = cum - T  # state before each chunk (exclusive prefix sum)
        final = cum[:, :, -1]
        if state_BHME is not None:
            prefix = prefix + state_BHME[:, :, None]
            final = final + state_BHME
        return (intra + q @ prefix).reshape(B, H, n * C, E)[:, :, :L], final, None
    g = (F.pad(g_BHL, (0, pad), mode="replicate") if pad else g_BHL).reshape(B, H, n, C)
    g_end = g[..., -1]  # B H n: G at each chunk's last position
    # G at the end of the previous chunk; chunk 0 of the sequence has no prefix, and any finite
    # reference does (its own first position).
    first = g[..., 0, 0] if g_prev_BH is None else g_prev_BH
    g_before = torch.cat((first[..., None], g_end[..., :-1]), dim=-1)
    expo = (g[..., :, None] - g[..., None, :]).masked_fill(~causal_CC, float("-inf"))
    intra = (scores * expo.exp()) @ v
    T = (k * (g_end[..., None] - g).exp()[..., None]).transpose(-1, -2) @ v  # referenced to g_end
    decay = (g_end - g_before).exp()  # B H n: how the carried state fades across chunk c
    # A scan over chunks. unbind (not T[:, :, c]) so that backward assembles the gradient of T
    # once, instead of a zero-filled full-size tensor per chunk.
    states = []
    state = torch.zeros_like(T[:, :, 0]) if state_BHME is None else state_BHME
    for T_c, decay_c in zip(T.unbind(2), decay.unbind(-1)):
        states.append(state)
        state = state * decay_c[..., None, None] + T_c
    prefix = torch.stack(states, dim=2)  # B H n M E, referenced to g_before
    inter = (q * (g - g_before[..., None]).exp()[..., None]) @ prefix
    return (intra + inter).reshape(B, H, n * C, E)[:, :, :L], state, g_end[..., -1]
