"""Machinery several kernels share: when a backend applies, the query-block loop over SDPA
with a mask per block, and the dense masked reference.

Shapes: B batch, H heads, L queries, S keys, D head dim.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lmtrain.model.attention.base import AttentionInputs


# -- when a backend applies -----------------------------------------------------------------
def flex_applies(q_BHLD: Tensor, inp: AttentionInputs, dropout: float) -> bool:
    """FlexAttention with a block mask: CUDA, queries aligned with keys (no KV cache, no
    per-row subsets), no attention dropout (FlexAttention has none)."""
    return q_BHLD.is_cuda and inp.aligned and dropout == 0.0


def triton_applies(x: Tensor) -> bool:
    """A Triton kernel: CUDA, a dtype it compiles for, Triton installed."""
    if not x.is_cuda or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# -- a linear bias folded into the dot product ---------------------------------------------------
# Positions are carried as two small integers, hi * FOLD_STEP + lo with 0 <= lo < FOLD_STEP and
# |hi| <= L / (2 FOLD_STEP): both are exact in bf16 (8 significant bits) for L up to 2^17.
FOLD_STEP = 256
# Where the fold keeps the bias exact: bf16 holds the two parts exactly, and SDPA's CPU and CUDA
# kernels accumulate the dot products of bf16 inputs in fp32. (fp16 could overflow the products.)
FOLD_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def fold_linear_bias(q_BHLD, k_BHSD, v_BHSD, slopes_H, pos_L):
    """q, k and v with extra dimensions that carry the bias m_h (k - q) through the dot product
    (softmax ignores the per-query constant), padded to a multiple of 8; scale the dot product by
    1 / sqrt(D) of the original D. The key's position, centred, is split as hi * FOLD_STEP + lo,
    two dimensions that bf16 holds exactly; q carries c_h FOLD_STEP and c_h, where c_h = m_h sqrt(D)
    rounded once to q's dtype (FOLD_STEP is a power of two, so c_h FOLD_STEP is exact too). Every
    product is then exact and the bias is c_h / sqrt(D) (k - q) exactly: in bf16, ALiBi with each
    slope within 2^-9 of its own, at any distance (one dimension holding the position would lose
    it past 256). v gets zeros."""
    B, H, L, D = q_BHLD.shape
    E = (D + 2 + 7) // 8 * 8 - D  # extra dimensions: the bias's two, then zeros
    c_H = (slopes_H * math.sqrt(D)).to(q_BHLD.dtype)
    q_extra = q_BHLD.new_zeros(1, H, 1, E)
    q_extra[0, :, 0, 0] = c_H * FOLD_STEP
    q_extra[0, :, 0, 1] = c_H
    centred = pos_L - (pos_L[0] + pos_L[-1]) // 2  # small products: fp32 accumulates them exactly
    hi = torch.div(centred, FOLD_STEP, rounding_mode="floor")
    k_extra = k_BHSD.new_zeros(1, 1, L, E)
    k_extra[0, 0, :, 0] = hi.to(k_BHSD.dtype)
    k_extra[0, 0, :, 1] = (centred - hi * FOLD_STEP).to(k_BHSD.dtype)
    q = torch.cat((q_BHLD, q_extra.expand(B, H, L, E)), dim=-1)
    k = torch.cat((k_BHSD, k_extra.expand(B, H, L, E)), dim=-1)
    return q, k, F.pad(v_BHSD, (0, E))


# -- document masking ---------------------------------------------------------------------------
def document_mask(inp: AttentionInputs, q_pos: Tensor, k_pos_S: Tensor) -> Optional[Tensor]:
    """B x 1 x l x S: the key is in the query's document (None without document ids). q_pos (l,
    or B x l per row) and k_pos index the sequence from its first key position."""
    if inp.doc_ids is None:
        return None
    p0 = inp.k_pos[0]
    doc_q = inp.doc_ids.gather(1, q_pos - p0) if q_pos.dim() == 2 else inp.doc_ids[:, q_pos - p0]
    return (doc_q[:, :, None] == inp.doc_ids[:, k_pos_S - p0][:, None, :]).unsqueeze(1)


def and_mask(mask: Tensor, allowed: Optional[Tensor]) -> Tensor:
    """A boolean or additive (-inf) mask, further limited to `allowed` (boolean)."""
    if allowed is None:
        return mask
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, float("-inf"))


# -- the query-block loop ------------------------------------------------------------------------
def blockwise_sdpa(q_BHLD: Tensor, k_BHSD: Tensor, v_BHSD: Tensor, q_pos: Tensor, k_pos_S: Tensor, *, block: int,
                   mask: Callable[[Tensor, Tensor], Tensor], window: Optional[int] = None,
                   dropout: float = 0.0) -> Tensor:
    """Queries in blocks of `block`, each attending through SDPA to the keys it can see, with
    the mask `mask(q_pos of the block, k_pos of its keys)` (boolean, or additive with -inf).

    Contiguous queries are the last L of the S key positions (aligned, or after a KV cache),
    so the block ending at query e sees only the first S - L + e keys, and with a `window`
    only the last `window` of those: the rest is never computed, and no mask is larger than
    one block's. Per-row query positions (B x L) see all S keys."""
    L, S = q_BHLD.shape[2], k_BHSD.shape[2]
    rows = q_pos.dim() == 2
    outs = []
    for start in range(0, L, block):
        qp = q_pos[..., start : start + block]
        n = qp.shape[-1]
        end = S if rows else S - L + start + n
        first = 0 if rows or window is None else max(0, S - L + start - window + 1)
        outs.append(F.scaled_dot_product_attention(
            q_BHLD[:, :, start : start + n], k_BHSD[:, :, first:end], v_BHSD[:, :, first:end],
            attn_mask=mask(qp, k_pos_S[first:end]), dropout_p=dropout))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


# -- the dense reference ---------------------------------------------------------------------------
def dense_attention(q_BHLD: Tensor, k_BHSD: Tensor, v_BHSD: Tensor, inp: AttentionInputs, *, dropout: float = 0.0,
                    weights: Optional[Callable[[Tensor, torch.dtype], Tensor]] = None) -> Tensor:
    """The plain formula over all L x S scores, in float32 at least:
    softmax(q k^T / sqrt(D) + bias, masked to visible keys), optionally multiplied by
    `weights(dist_LS, dtype)` (H x L x S, e.g. adaptive span's soft mask) and renormalised,
    then dropout, times v. Visible: k_pos <= q_pos (per-row q_pos: B x L x S), and in the
    query's document when the inputs carry document ids."""
    dtype = q_BHLD.dtype
    q, k, v = (t.to(torch.promote_types(t.dtype, torch.float32)) for t in (q_BHLD, k_BHSD, v_BHSD))
    scores_BHLS = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if inp.position.has_score_bias:
        scores_BHLS = scores_BHLS + inp.position.score_bias(inp.q_pos, inp.k_pos).to(scores_BHLS.dtype)
    dist_LS = inp.q_pos[..., None] - inp.k_pos  # L S, or B L S for per-row query positions
    scores_BHLS = scores_BHLS.masked_fill((dist_LS < 0).unsqueeze(-3), float("-inf"))
    scores_BHLS = and_mask(scores_BHLS, document_mask(inp, inp.q_pos, inp.k_pos))
    probs = scores_BHLS.softmax(dim=-1)
    if weights is not None:
        probs = probs * weights(dist_LS, probs.dtype)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return (probs @ v).to(dtype)
