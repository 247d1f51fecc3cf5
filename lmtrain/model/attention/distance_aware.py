"""DA-Transformer attention (Wu, Wu and Huang, NAACL 2021): scores rescaled by a learned
function of the distance, per head.

Per head h, with R = w_h |i - j| and v_h learned,

    Rhat_ij = (1 + exp(v_h)) / (1 + exp(v_h - R_ij))          (a rescaled sigmoid, Rhat_ii = 1)
    attention = softmax(ReLU(q k^T) * Rhat / sqrt(D)) v        (causal mask after the product)

w_h > 0 favours far keys (Rhat rises to 1 + exp(v_h)), w_h < 0 near ones (Rhat falls to 0).
The rescaling multiplies the scores, so it is a kernel of its own and not an additive bias:
it refuses schemes with a score bias (use `none`, `rope`, `sinusoidal` or `learned`). ReLU
sets every negative score to 0, so far keys keep weight exp(0) and attention dilutes as L
grows (patterns.md, "Distance scores"); the extrapolation study reports what that does.

Paths:
  * blocks    - CPU (and GPU without FlexAttention): queries in blocks, each over the keys up
                to its last query, so that no L x S x H buffer exists at once. In training
                with more than one block, each block is recomputed in the backward
                (activation checkpointing per block): the graph keeps q, k, v and the output,
                not the L^2/2 probabilities.
  * flex      - FlexAttention on CUDA: ReLU and Rhat as the `score_mod`, a causal block mask.
  * reference - the formula above over all L x S scores in float32 (float64 for float64).

Shapes: B batch, H heads, L queries, S keys, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lmtrain.model.attention.base import ATTENTION, AttentionConfig, AttentionKernel, Capabilities
from lmtrain.model.attention.flex import causal_block_mask, flex_fn
from lmtrain.model.attention.paths import and_mask, document_mask, flex_applies


@dataclass
class DistanceAwareConfig(AttentionConfig):
    kind: str = "distance_aware"
    init_w: float = 0.0  # w_h of every head at initialisation (0: Rhat = 1, no distance preference)
    init_v: float = 0.0  # v_h at initialisation: far keys' scores may grow up to 1 + exp(v) times
    # Most bytes one block of scores may take on the blocks path; queries are chunked to fit.
    mask_budget_mb: int = 64
    block: int = 0  # queries per block on the blocks path; 0 = as many as mask_budget_mb allows
    # auto: flex on CUDA (no dropout, aligned queries, no documents), else blocks.
    backend: str = "auto"


def rescale(w: Tensor, v: Tensor, dist: Tensor) -> Tensor:
    """Rhat for per-head w, v (broadcast against dist) and distances |i - j|."""
    return (1 + v.exp()) / (1 + torch.exp(v - w * dist))


@ATTENTION.register("distance_aware")
class DistanceAwareAttention(AttentionKernel):
    Config = DistanceAwareConfig
    caps = Capabilities(score_bias=False, kv_cache=True, query_rows=True, document_mask=True)
    refusals = {"score_bias": "the DA-Transformer multiplies the scores by its own learned function of the distance; "
                              "an additive bias would be rescaled with them"}
    backends = ("blocks", "flex")
    init_options = {"init_w": ("w", lambda cfg: cfg.init_w), "init_v": ("v", lambda cfg: cfg.init_v)}
    test_options = {"init_w": 0.05, "init_v": 0.5, "block": 16}

    cfg: DistanceAwareConfig

    def __init__(self, cfg: DistanceAwareConfig, *, d_model: int, n_heads: int, dropout: float, layer: int = 0):
        super().__init__(cfg, d_model=d_model, n_heads=n_heads, dropout=dropout, layer=layer)
        self.w = nn.Parameter(torch.empty(n_heads))
        self.v = nn.Parameter(torch.empty(n_heads))
        self.init_parameters()

    @classmethod
    def check(cls, a) -> list[str]:
        reasons = super().check(a)
        if a.model.attention.mask_budget_mb <= 0:
            reasons.append("model.attention.mask_budget_mb must be positive")
        if a.model.attention.block < 0:
            reasons.append("model.attention.block must be 0 (from mask_budget_mb) or positive")
        return reasons

    @classmethod
    def own_parameters(cls, a) -> int:
        return 2 * a.model.n_heads

    @torch.no_grad()
    def init_parameters(self) -> None:
        self.w.fill_(self.cfg.init_w)
        self.v.fill_(self.cfg.init_v)

    # -- statistics (lmtrain/model/hooks.py) ----------------------------------------------
    def head_stats(self) -> dict[str, Tensor]:
        return {"da.w": self.w.detach(), "da.v": self.v.detach()}

    def head_stat_limits(self) -> dict[str, float]:
        return {}

    @torch.no_grad()
    def distance_profile(self, d: Tensor) -> dict[str, Tensor]:
        """H x n: Rhat at the distances d."""
        return {"da.rescale": rescale(self.w.float()[:, None], self.v.float()[:, None], d.float()[None])}

    # -- paths ----------------------------------------------------------------------------
    def auto_backend(self, q_BHLD, k_BHSD, inp) -> str:
        return "flex" if flex_applies(q_BHLD, inp, self.attn_dropout) and inp.doc_ids is None else "blocks"

    def route(self, q_BHLD, k_BHSD, inp) -> str:
        path = super().route(q_BHLD, k_BHSD, inp)
        if path == "flex" and (not inp.aligned or inp.doc_ids is not None):
            path = "blocks"  # a KV cache, per-row queries or documents: the general path
        return path

    def fast(self, path, q_BHLD, k_BHSD, v_BHSD, inp):
        if path == "flex":
            return self._flex(q_BHLD, k_BHSD, v_BHSD)
        return self._blocks(q_BHLD, k_BHSD, v_BHSD, inp)

    def _block(self, q_BHlD, k_BHsD, v_BHsD, q_pos, k_pos, allowed):
        """One block of queries over its keys: the formula with the causal (and document) mask."""
        D = q_BHlD.shape[-1]
        dist = q_pos[..., None] - k_pos  # ([B] l s)
        # Rhat in fp32 at least (bf16 rounds distances above 256), then in the scores' dtype.
        dt = torch.promote_types(q_BHlD.dtype, torch.float32)
        w, v = (p.to(dt)[:, None, None] for p in (self.w, self.v))
        scale = rescale(w, v, dist.abs().to(dt).unsqueeze(-3)).to(q_BHlD.dtype)  # ([B] H l s)
        scores = torch.relu(q_BHlD @ k_BHsD.transpose(-1, -2)) * (scale / math.sqrt(D))
        scores = and_mask(scores.masked_fill((dist < 0).unsqueeze(-3), float("-inf")), allowed)
        probs = F.dropout(scores.softmax(dim=-1), p=self.attn_dropout, training=self.attn_dropout > 0)
        return probs @ v_BHsD

    def _blocks(self, q_BHLD, k_BHSD, v_BHSD, inp):
        B, H, L, D = q_BHLD.shape
        S = k_BHSD.shape[2]
        rows = inp.per_row
        # A block's scores, scale and probabilities: about three B x H x l x S buffers.
        per_query = 3 * B * H * S * q_BHLD.element_size()
        block = min(L, self.cfg.block or max(1, (self.cfg.mask_budget_mb << 20) // per_query))
        recompute = torch.is_grad_enabled() and L > block
        outs = []
        for s0 in range(0, L, block):
            n = min(block, L - s0)
            end = S if rows else S - L + s0 + n  # contiguous queries see no later key
            qp = inp.q_pos[..., s0:s0 + n]
            kp = inp.k_pos[:end]
            allowed = document_mask(inp, qp, kp)
            args = (q_BHLD[:, :, s0:s0 + n], k_BHSD[:, :, :end], v_BHSD[:, :, :end], qp, kp, allowed)
            outs.append(checkpoint(self._block, *args, use_reentrant=False) if recompute else self._block(*args))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def score_mod(self):
        """ReLU and Rhat as a FlexAttention score_mod: one function per module, reading w and v
        at call time, so torch.compile sees the same function every call (no recompiles)."""
        if getattr(self, "_score_mod", None) is None:
            module = self

            def da(score, b, h, q_idx, kv_idx):
                dist = (q_idx - kv_idx).abs().to(score.dtype)
                return torch.relu(score) * rescale(module.w[h].to(score.dtype), module.v[h].to(score.dtype), dist)

            self._score_mod = da
        return self._score_mod

    def _flex(self, q_BHLD, k_BHSD, v_BHSD):
        L, S = q_BHLD.shape[2], k_BHSD.shape[2]
        fn = flex_fn(q_BHLD.is_cuda)
        return fn(q_BHLD, k_BHSD, v_BHSD, score_mod=self.score_mod(),
                  block_mask=causal_block_mask(L, S, str(q_BHLD.device)), scale=1 / math.sqrt(q_BHLD.shape[-1]))

    def reference(self, q_BHLD, k_BHSD, v_BHSD, inp):
        """softmax(ReLU(q k^T) * Rhat / sqrt(D)) v over all L x S scores, masked after the product."""
        dtype = q_BHLD.dtype
        q, k, v = (t.to(torch.promote_types(t.dtype, torch.float32)) for t in (q_BHLD, k_BHSD, v_BHSD))
        w, v_h = (p.to(q.dtype).view(-1, 1, 1) for p in (self.w, self.v))
        i_minus_j = inp.q_pos[..., None] - inp.k_pos  # L S, or B L S
        rhat = (1 + torch.exp(v_h)) / (1 + torch.exp(v_h - w * i_minus_j.abs().to(q.dtype).unsqueeze(-3)))
        scores = torch.relu(q @ k.transpose(-1, -2)) * rhat / math.sqrt(q.shape[-1])
        scores = scores.masked_fill((i_minus_j < 0).unsqueeze(-3), float("-inf"))
        scores = and_mask(scores, document_mask(inp, inp.q_pos, inp.k_pos))
        probs = F.dropout(scores.softmax(dim=-1), p=self.attn_dropout, training=self.attn_dropout > 0)
        return (probs @ v).to(dtype)
