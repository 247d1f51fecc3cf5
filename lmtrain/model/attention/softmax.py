"""Causal softmax attention (Vaswani et al. 2017) with optional additive score bias.

Paths, chosen once per call from the inputs, never from a kind name:
  * sdpa      - torch's scaled_dot_product_attention. Without a bias and with aligned
                positions it uses `is_causal=True` (flash kernels on CPU and GPU). With a
                bias or a KV cache it passes an explicit mask, built per block of queries
                so that no L x S x H buffer exists at once at long lengths.
  * folded    - a linear distance bias m_h (k - q) (ALiBi) with aligned positions, in fp32,
                fp64 or bf16 (the CPU training path): per query, the bias is a constant, which
                softmax ignores, plus m_h k. Two extra dimensions carry it through the dot
                product (k gets its centred position as hi * 256 + lo, both exact in bf16; q
                gets m_h sqrt(D) times 256 and 1: `paths.fold_linear_bias`), so SDPA runs its
                fused causal kernel with `is_causal=True`: no mask is built and the masked
                upper triangle is skipped. The head dim is padded to a multiple of 8 (v too:
                the fused kernel needs equal head dims), about 12% more attention FLOPs for
                D = 64 against 2.4x for a materialised mask. Not in fp16 (its products of
                positions and slopes could overflow).
  * documents - aligned positions with document ids (data.document_mask): query blocks over the
                keys from the start of their document, with a boolean mask (causal, same
                document) so that the fused kernel runs; ALiBi folded as on `folded`.
  * flex      - FlexAttention with the bias as a `score_mod` and a causal block mask
                (compiled; used on CUDA for biased attention, where it skips the masked
                half of the work instead of materialising a mask).
  * reference - the plain formula in float32; tests compare the other paths against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmtrain.model.attention.base import ATTENTION, AttentionConfig, AttentionKernel, Capabilities
from lmtrain.model.attention.flex import causal_block_mask, flex_fn
from lmtrain.model.attention.paths import (
    FOLD_DTYPES,
    and_mask,
    blockwise_sdpa,
    dense_attention,
    document_mask,
    flex_applies,
    fold_linear_bias,
)


@dataclass
class SoftmaxConfig(AttentionConfig):
    kind: str = "softmax"
    # auto: flex on CUDA when there is a score bias, else sdpa.
    backend: str = "auto"
    # Most bytes a materialised mask block may take; queries are chunked to fit.
    mask_budget_mb: int = 64
    # Fold a linear distance bias (ALiBi) into the dot product on the sdpa path (fp32/fp64,
    # aligned positions), instead of materialising it as a mask.
    fold_linear_bias: bool = True


def document_starts(doc_BL):
    """B x L: the index of the first token of each token's document (document ids never decrease)."""
    t = torch.arange(doc_BL.shape[1], device=doc_BL.device)
    new = torch.ones_like(doc_BL, dtype=torch.bool)
    new[:, 1:] = doc_BL[:, 1:] != doc_BL[:, :-1]
    return torch.where(new, t, 0).cummax(1).values


@ATTENTION.register("softmax")
class SoftmaxAttention(AttentionKernel):
    Config = SoftmaxConfig
    caps = Capabilities(score_bias=True, kv_cache=True, query_rows=True, document_mask=True, head_shards=True)
    backends = ("sdpa", "flex")

    cfg: SoftmaxConfig

    @classmethod
    def check(cls, a) -> list[str]:
        reasons = super().check(a)
        if a.model.attention.mask_budget_mb <= 0:
            reasons.append("model.attention.mask_budget_mb must be positive")
        return reasons

    def auto_backend(self, q_BHLD, k_BHSD, inp) -> str:
        return "flex" if inp.position.has_score_bias and flex_applies(q_BHLD, inp, self.attn_dropout) else "sdpa"

    def route(self, q_BHLD, k_BHSD, inp) -> str:
        path = super().route(q_BHLD, k_BHSD, inp)
        if path == "flex" and (not inp.aligned or inp.doc_ids is not None):
            path = "sdpa"  # a KV cache, a subset of queries per row (ACT) or documents: a mask per row
        if path == "sdpa" and inp.aligned and inp.doc_ids is not None and (
                not inp.position.has_score_bias or self._foldable(q_BHLD, inp)):
            return "documents"
        if path == "sdpa" and inp.position.has_score_bias and inp.aligned and inp.doc_ids is None and self._foldable(
                q_BHLD, inp):
            path = "folded"
        return path

    def _foldable(self, q_BHLD, inp) -> bool:
        return (self.cfg.fold_linear_bias and inp.position.linear_bias_slopes() is not None
                and q_BHLD.dtype in FOLD_DTYPES)

    def fast(self, path, q_BHLD, k_BHSD, v_BHSD, inp):
        if path == "documents":
            return self._documents(q_BHLD, k_BHSD, v_BHSD, inp)
        if path == "flex":
            return self._flex(q_BHLD, k_BHSD, v_BHSD, inp.position)
        if path == "folded":
            return self._folded(q_BHLD, k_BHSD, v_BHSD, inp.position.linear_bias_slopes(), inp.q_pos)
        return self._sdpa(q_BHLD, k_BHSD, v_BHSD, inp)

    def _folded(self, q_BHLD, k_BHSD, v_BHSD, slopes_H, pos_L):
        """SDPA with `is_causal=True` and the linear bias folded into an extra dimension."""
        D = q_BHLD.shape[-1]
        q, k, v = fold_linear_bias(q_BHLD, k_BHSD, v_BHSD, slopes_H, pos_L)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout, is_causal=True,
                                             scale=1 / math.sqrt(D))
        return out[..., :D]

    def _documents(self, q_BHLD, k_BHSD, v_BHSD, inp):
        """Aligned positions with document ids: queries in blocks, each over the keys from the
        start of its first query's document to its last query (earlier documents are never
        computed), with a boolean mask (causal, same document), so the fused kernel runs. A
        linear bias (ALiBi) is folded into the dot product as on the `folded` path."""
        B, H, L, D = q_BHLD.shape
        slopes = inp.position.linear_bias_slopes() if inp.position.has_score_bias else None
        q, k, v = (fold_linear_bias(q_BHLD, k_BHSD, v_BHSD, slopes, inp.q_pos) if slopes is not None
                   else (q_BHLD, k_BHSD, v_BHSD))
        starts_BL = document_starts(inp.doc_ids)
        first_keys = starts_BL.amin(0).tolist()  # per query: the earliest key any row needs
        block = max(1, min(L, (self.cfg.mask_budget_mb << 20) // max(1, B * L)))
        pos, doc = inp.q_pos, inp.doc_ids
        outs = []
        for s0 in range(0, L, block):
            e = min(L, s0 + block)
            f = first_keys[s0]
            visible = (pos[f:e][None, :] <= pos[s0:e][:, None]) & (doc[:, s0:e, None] == doc[:, None, f:e])
            outs.append(F.scaled_dot_product_attention(q[:, :, s0:e], k[:, :, f:e], v[:, :, f:e],
                                                       attn_mask=visible[:, None], dropout_p=self.attn_dropout,
                                                       scale=1 / math.sqrt(D)))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        return out[..., :D]

    def _sdpa(self, q_BHLD, k_BHSD, v_BHSD, inp):
        position, q_pos, k_pos_S = inp.position, inp.q_pos, inp.k_pos
        if not position.has_score_bias and inp.aligned and inp.doc_ids is None:
            # Aligned positions without a bias: the kernel's own causal mask, no buffer.
            return F.scaled_dot_product_attention(q_BHLD, k_BHSD, v_BHSD, dropout_p=self.attn_dropout, is_causal=True)
        S = k_BHSD.shape[2]
        batch = q_pos.shape[0] if inp.per_row or inp.doc_ids is not None else 1
        if position.has_score_bias:
            bytes_per_row = batch * self.n_heads * S * q_BHLD.element_size()
        else:
            bytes_per_row = batch * S  # a boolean mask, shared by the heads
        chunk = max(1, (self.cfg.mask_budget_mb << 20) // bytes_per_row)

        def mask(q_pos_l, k_pos):
            visible_LS = k_pos <= q_pos_l[..., None]  # ([B] l S)
            if position.has_score_bias:
                bias = position.score_bias(q_pos_l, k_pos).to(q_BHLD.dtype)  # ([B] H l S)
                m = bias.masked_fill(~visible_LS.unsqueeze(-3), float("-inf"))
            else:
                m = visible_LS.unsqueeze(-3) if inp.per_row else visible_LS
            return and_mask(m, document_mask(inp, q_pos_l, k_pos))

        return blockwise_sdpa(q_BHLD, k_BHSD, v_BHSD, q_pos, k_pos_S, block=chunk, mask=mask,
                              dropout=self.attn_dropout)

    def _flex(self, q_BHLD, k_BHSD, v_BHSD, position):
        L, S = q_BHLD.shape[2], k_BHSD.shape[2]
        block_mask = causal_block_mask(L, S, str(q_BHLD.device))
        # Compile on GPU; on CPU only the eager forward exists (used by tests).
        fn = flex_fn(q_BHLD.is_cuda)
        return fn(q_BHLD, k_BHSD, v_BHSD, score_mod=position.score_mod(), block_mask=block_mask)

    def reference(self, q_BHLD, k_BHSD, v_BHSD, inp):
        return dense_attention(q_BHLD, k_BHSD, v_BHSD, inp, dropout=self.attn_dropout)
