"""Causal softmax attention (Vaswani et al. 2017) with optional additive score bias.

Paths, chosen once per call from the inputs, never from a kind name:
  * sdpa      - torch's scaled_dot_product_attention. Without a bias and with aligned
                positions it uses `is_causal=True` (flash kernels on CPU and GPU). With a
                bias or a KV cache it passes an explicit mask, built per block of queries
                so that no L x S x H buffer exists at once at long lengths.
  * folded    - a linear distance bias m_h (k - q) (ALiBi) with aligned positions, in fp32 or
                fp64 (the CPU training path): per query, the bias is a constant, which
                softmax ignores, plus m_h k. One extra dimension carries it through the dot
                product (q gets m_h sqrt(D), k gets its position, centred), so SDPA runs its
                fused causal kernel with `is_causal=True`: no mask is built and the masked
                upper triangle is skipped. The head dim is padded to a multiple of 8 (v too:
                the fused kernel needs equal head dims), about 12% more attention FLOPs for
                D = 64 against 2.4x for a materialised mask. Not in bf16/fp16, where k's
                positions would lose their precision.
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
from torch import Tensor

from lmtrain.model.attention.base import ATTENTION, AttentionConfig, AttentionKernel
from lmtrain.model.attention.flex import causal_block_mask, flex_fn

BACKENDS = ("auto", "sdpa", "flex", "reference")


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


@ATTENTION.register("softmax")
class SoftmaxAttention(AttentionKernel):
    Config = SoftmaxConfig
    supports_score_bias = True
    supports_kv_cache = True
    supports_query_rows = True
    deterministic_recompute = True

    cfg: SoftmaxConfig

    @classmethod
    def check(cls, model) -> list[str]:
        reasons = super().check(model)
        cfg = model.attention
        if cfg.backend not in BACKENDS:
            reasons.append(f"model.attention.backend={cfg.backend!r}: choose one of {', '.join(BACKENDS)}")
        if cfg.backend == "flex" and model.dropout > 0:
            reasons.append("model.attention.backend=flex does not support dropout; set model.dropout=0 or backend=sdpa")
        if cfg.mask_budget_mb <= 0:
            reasons.append("model.attention.mask_budget_mb must be positive")
        return reasons

    def _backend(self, q_BHLD: Tensor, k_BHSD: Tensor, has_bias: bool, q_pos_dim: int) -> str:
        if q_pos_dim == 2 and self.cfg.backend == "flex":
            return "sdpa"  # a subset of queries per row (ACT's running positions): block masks don't apply
        if self.cfg.backend != "auto":
            return self.cfg.backend
        aligned = q_BHLD.shape[2] == k_BHSD.shape[2] and q_pos_dim == 1
        dropout = self.dropout if self.training else 0.0
        if q_BHLD.is_cuda and has_bias and aligned and dropout == 0.0:
            return "flex"
        return "sdpa"

    def fast(self, q_BHLD, k_BHSD, v_BHSD, *, position, q_pos_L, k_pos_S, aux):
        has_bias = position.has_score_bias
        path = self._backend(q_BHLD, k_BHSD, has_bias, q_pos_L.dim())
        if (path == "sdpa" and has_bias and self.cfg.fold_linear_bias and position.linear_bias_slopes() is not None
                and q_BHLD.dtype in (torch.float32, torch.float64) and q_pos_L.dim() == 1
                and q_BHLD.shape[2] == k_BHSD.shape[2]):
            path = "folded"
        self.path_counts[path] += 1
        if path == "reference":
            return self.reference(q_BHLD, k_BHSD, v_BHSD, position=position, q_pos_L=q_pos_L, k_pos_S=k_pos_S, aux=aux)
        if path == "flex":
            return self._flex(q_BHLD, k_BHSD, v_BHSD, position)
        if path == "folded":
            return self._folded(q_BHLD, k_BHSD, v_BHSD, position.linear_bias_slopes(), q_pos_L)
        return self._sdpa(q_BHLD, k_BHSD, v_BHSD, position, q_pos_L, k_pos_S)

    def _folded(self, q_BHLD, k_BHSD, v_BHSD, slopes_H, pos_L):
        """SDPA with `is_causal=True` and the linear bias folded into an extra dimension."""
        dropout = self.dropout if self.training else 0.0
        B, H, L, D = q_BHLD.shape
        E = (D + 1 + 7) // 8 * 8 - D  # extra dimensions: the bias's, then zeros
        q_extra = q_BHLD.new_zeros(1, H, 1, E)
        q_extra[0, :, 0, 0] = slopes_H.to(q_BHLD.dtype) * math.sqrt(D)
        k_extra = k_BHSD.new_zeros(1, 1, L, E)
        # Centred, so that the largest product stays small (fp32 keeps ~1e-5 of the bias).
        k_extra[0, 0, :, 0] = pos_L.to(k_BHSD.dtype) - (pos_L[0] + pos_L[-1]).to(k_BHSD.dtype) / 2
        q = torch.cat((q_BHLD, q_extra.expand(B, H, L, E)), dim=-1)
        k = torch.cat((k_BHSD, k_extra.expand(B, H, L, E)), dim=-1)
        v = F.pad(v_BHSD, (0, E))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=1 / math.sqrt(D))
        return out[..., :D]

    def _sdpa(self, q_BHLD, k_BHSD, v_BHSD, position, q_pos_L, k_pos_S):
        dropout = self.dropout if self.training else 0.0
        L, S = q_BHLD.shape[2], k_BHSD.shape[2]
        rows = q_pos_L.dim() == 2  # per-row query positions (B L): a subset of the positions
        if not position.has_score_bias and L == S and not rows:
            # Aligned positions without a bias: the kernel's own causal mask, no buffer.
            return F.scaled_dot_product_attention(q_BHLD, k_BHSD, v_BHSD, dropout_p=dropout, is_causal=True)
        batch = q_pos_L.shape[0] if rows else 1
        if position.has_score_bias:
            bytes_per_row = batch * self.n_heads * S * q_BHLD.element_size()
        else:
            bytes_per_row = batch * S  # a boolean mask, shared by the heads
        chunk = max(1, (self.cfg.mask_budget_mb << 20) // bytes_per_row)
        outs = []
        for start in range(0, L, chunk):
            q_pos = q_pos_L[..., start : start + chunk]
            # Contiguous queries are the last L of the S key positions (aligned, or after a KV
            # cache), so this chunk sees only the first S - L + end keys: the rest is never computed.
            end = S if rows else S - L + start + q_pos.shape[-1]
            k_pos, k, v = k_pos_S[:end], k_BHSD[:, :, :end], v_BHSD[:, :, :end]
            visible_LS = k_pos <= q_pos[..., None]  # ([B] l S)
            if position.has_score_bias:
                bias = position.score_bias(q_pos, k_pos).to(q_BHLD.dtype)  # ([B] H l S)
                mask = bias.masked_fill(~visible_LS.unsqueeze(-3), float("-inf"))
            else:
                mask = visible_LS.unsqueeze(-3) if rows else visible_LS
            outs.append(
                F.scaled_dot_product_attention(
                    q_BHLD[:, :, start : start + chunk], k, v, attn_mask=mask, dropout_p=dropout
                )
            )
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _flex(self, q_BHLD, k_BHSD, v_BHSD, position):
        L, S = q_BHLD.shape[2], k_BHSD.shape[2]
        if L != S:
            raise ValueError("the flex path needs aligned queries and keys (no KV cache)")
        block_mask = causal_block_mask(L, S, str(q_BHLD.device))
        # Compile on GPU; on CPU only the eager forward exists (used by tests).
        fn = flex_fn(q_BHLD.is_cuda)
        return fn(q_BHLD, k_BHSD, v_BHSD, score_mod=position.score_mod(), block_mask=block_mask)

    def reference(self, q_BHLD, k_BHSD, v_BHSD, *, position, q_pos_L, k_pos_S, aux):
        dtype = q_BHLD.dtype
        q, k, v = (t.to(torch.promote_types(t.dtype, torch.float32)) for t in (q_BHLD, k_BHSD, v_BHSD))
        scores_BHLS = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if position.has_score_bias:
            scores_BHLS = scores_BHLS + position.score_bias(q_pos_L, k_pos_S).to(scores_BHLS.dtype)
        visible_LS = k_pos_S <= q_pos_L[..., None]  # L S, or B L S for per-row query positions
        scores_BHLS = scores_BHLS.masked_fill(~visible_LS.unsqueeze(-3), float("-inf"))
        probs = F.dropout(scores_BHLS.softmax(dim=-1), p=self.dropout, training=self.training)
        return (probs @ v).to(dtype)
