"""Adaptive attention span (Sukhbaatar et al., ACL 2019): each head learns how far back it looks.

Per head h a learnable span z_h in [0, S] (stored as z_h / S in [0, 1], as the official
code does, and clamped to that range after every optimizer step) softly masks the key at
distance x = i - j with

    m_z(x) = clamp((R + z - x) / R, 0, 1)          (ramp R)

The mask multiplies the attention weights after the softmax, which are then renormalised.
That is the same as adding log m_z(x) to the scores (m = 0: masked), which is how the
fast paths apply it, so that the usual kernels run. The span loss
`loss_coef * mean_h z_h`, summed over layers (= coef * S * mean_h(z_h / S)), is added to the
training loss as `span` (a parameter loss, lmtrain/model/hooks.py).

Cost follows the span: keys at distances >= max_h z_h + R have weight 0 for every head, so
only the window W = max_h z_h + R, rounded up to `block`, is ever computed:

  * chunked   - CPU (and GPU without FlexAttention): queries in blocks of `block`, each
                attending to its own band of W - 1 + block keys through SDPA with the
                log-mask (plus any positional bias) as `attn_mask`. In training the bands are
                overlapping windows of the keys and every block shares one mask, so all
                blocks run in two SDPA calls; with a KV cache, a loop over blocks. Time and
                memory O(L x W).
  * flex      - FlexAttention with the log-mask as `score_mod` and a banded causal block
                mask, so blocks beyond the window are skipped (compiled on GPU).
  * reference - the dense formula of the paper (softmax, multiply by the mask, renormalise)
                over all L x S scores in float32; the tests compare the paths against it.

Shapes: B batch, H heads, L queries, S keys, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmtrain.model.attention.base import ATTENTION, AttentionConfig, AttentionKernel, Capabilities
from lmtrain.model.attention.flex import causal_block_mask, flex_fn
from lmtrain.model.attention.paths import and_mask, blockwise_sdpa, dense_attention, document_mask, flex_applies


@dataclass
class AdaptiveSpanConfig(AttentionConfig):
    kind: str = "adaptive_span"
    max_span: int = 1024  # S: the longest span a head may learn, in positions
    ramp: int = 32  # R: width of the soft edge of the mask
    init_span: float = 0.0  # z of every head at initialisation, in positions (official default 0)
    loss_coef: float = 2e-6  # span loss: coef * mean_h z_h, summed over layers
    block: int = 64  # keys are trimmed to a multiple of this; queries are processed in blocks of it
    fixed: bool = False  # spans stay at init_span: not learned, no span loss (an experiment's control)
    # auto: flex on CUDA (no dropout), else chunked.
    backend: str = "auto"


def log_span_mask(z_H: Tensor, dist: Tensor, ramp: int) -> Tensor:
    """log m_z(x) per head: H x (dist's shape). -inf where the mask is 0 or the key is in the
    future (dist < 0). Differentiable in z: 1 / (R m) on the ramp, 0 where m = 1 (x < z)
    or m = 0."""
    shape = (-1,) + (1,) * dist.dim()
    m = ((ramp + z_H.view(shape) - dist.to(z_H.dtype)) / ramp).clamp(max=1.0)
    tiny = torch.finfo(m.dtype).tiny
    logm = torch.where(m > 0, torch.log(m.clamp(min=tiny)), float("-inf"))
    return logm.masked_fill(dist < 0, float("-inf"))


@ATTENTION.register("adaptive_span")
class AdaptiveSpanAttention(AttentionKernel):
    Config = AdaptiveSpanConfig
    caps = Capabilities(score_bias=True, kv_cache=True, document_mask=True, head_shards=True)
    backends = ("chunked", "flex")
    init_options = {"init_span": ("span_frac", lambda cfg: cfg.init_span / cfg.max_span)}
    test_options = {"init_span": 6.0, "max_span": 64, "ramp": 8, "block": 8}

    cfg: AdaptiveSpanConfig

    def __init__(self, cfg: AdaptiveSpanConfig, *, d_model: int, n_heads: int, dropout: float, layer: int = 0):
        super().__init__(cfg, d_model=d_model, n_heads=n_heads, dropout=dropout, layer=layer)
        self.max_span, self.ramp = cfg.max_span, cfg.ramp
        # z_h / S, one per head; no weight decay (1-D), clamped to [0, 1] after each step.
        self.span_frac = nn.Parameter(torch.empty(n_heads), requires_grad=not cfg.fixed)
        self.init_parameters()

    @classmethod
    def check(cls, a) -> list[str]:
        reasons = super().check(a)
        cfg = a.model.attention
        if cfg.max_span < 1:
            reasons.append("model.attention.max_span must be at least 1")
        if cfg.ramp < 1:
            reasons.append("model.attention.ramp must be at least 1")
        if not 0 <= cfg.init_span <= cfg.max_span:
            reasons.append(f"model.attention.init_span must be in [0, max_span={cfg.max_span}]")
        if cfg.loss_coef < 0:
            reasons.append("model.attention.loss_coef must be 0 or positive")
        if cfg.block < 1:
            reasons.append("model.attention.block must be at least 1")
        return reasons

    @classmethod
    def own_parameters(cls, a) -> int:
        return a.model.n_heads  # z_h / S

    @torch.no_grad()
    def init_parameters(self) -> None:
        self.span_frac.fill_(self.cfg.init_span / self.cfg.max_span)

    # -- the span ---------------------------------------------------------------------
    def spans(self) -> Tensor:
        """z_h in positions, H."""
        return self.span_frac * self.max_span

    def head_spans(self, inp) -> Tensor:
        """z_h of the heads this call attends with (sequence parallelism: a subset), H'."""
        z_H = self.spans()
        return z_H if inp is None or inp.heads is None else z_H[inp.heads]

    def window(self) -> int:
        """Distances that can have a non-zero weight for some head: max z + R, rounded up to a block."""
        reach = float(self.spans().detach().max()) + self.ramp
        return int(math.ceil(reach / self.cfg.block) * self.cfg.block)

    # -- lifecycle hooks (lmtrain/model/hooks.py) ---------------------------------------
    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Keep z_h / S in [0, 1]."""
        self.span_frac.clamp_(0.0, 1.0)

    def parameter_losses(self) -> dict[str, Tensor]:
        """The span loss of this layer (training only)."""
        if self.cfg.loss_coef and self.training and not self.cfg.fixed:
            return {"span": self.cfg.loss_coef * self.spans().mean()}
        return {}

    def head_stats(self) -> dict[str, Tensor]:
        return {"span": self.spans().detach()}

    def head_stat_limits(self) -> dict[str, float]:
        return {"span": float(self.max_span)}

    # -- paths ----------------------------------------------------------------------
    def auto_backend(self, q_BHLD, k_BHSD, inp) -> str:
        return "flex" if flex_applies(q_BHLD, inp, self.attn_dropout) else "chunked"

    def route(self, q_BHLD, k_BHSD, inp) -> str:
        path = super().route(q_BHLD, k_BHSD, inp)
        # A KV cache or documents: no shared block mask.
        return "chunked" if path == "flex" and (not inp.aligned or inp.doc_ids is not None) else path

    def fast(self, path, q_BHLD, k_BHSD, v_BHSD, inp):
        if path == "flex":
            return self._flex(q_BHLD, k_BHSD, v_BHSD, inp)
        return self._chunked(q_BHLD, k_BHSD, v_BHSD, inp.position, inp.q_pos, inp.k_pos, inp)

    def _chunked(self, q_BHLD, k_BHSD, v_BHSD, position, q_pos_L, k_pos_S, inp=None):
        L, S = q_BHLD.shape[2], k_BHSD.shape[2]
        # Training and full-sequence evaluation: positions are consecutive and queries align
        # with keys. If the bias depends on distance only, every block of queries sees the
        # same distances, and the banded path runs all blocks in two SDPA calls.
        W = self.window()  # read once per call (a host sync)
        relative = not position.has_score_bias or position.relative_bias
        docs = inp is not None and inp.doc_ids is not None
        if (L == S and relative and not docs and self._banded_is_cheaper(L, W)
                and bool(q_pos_L[-1] - q_pos_L[0] == L - 1) and torch.equal(q_pos_L, k_pos_S)):
            return self._banded(q_BHLD, k_BHSD, v_BHSD, position, W, self.head_spans(inp))
        # Any positions (decoding with a KV cache), or a window as long as the sequence: a loop
        # over blocks of queries, each with the keys of its own window (at most its causal prefix).
        z_H = self.head_spans(inp).to(q_BHLD.dtype)
        return blockwise_sdpa(q_BHLD, k_BHSD, v_BHSD, q_pos_L, k_pos_S, block=self.cfg.block, window=W,
                              mask=lambda q_pos, k_pos: and_mask(self._mask(z_H, position, q_pos, k_pos, W),
                                                                 document_mask(inp, q_pos, k_pos) if docs else None),
                              dropout=self.attn_dropout)

    def _banded_is_cheaper(self, L: int, W: int) -> bool:
        """Cost model, in query-key pairs. The banded path computes blk + W - 1 keys for every
        block (plus copying the windows). The block loop computes at most each block's causal
        prefix, but the backward pass of each block's slices writes full-length gradients of
        q, k and v: 3 L D elements, and one element write costs about as much as 1 / (0.2 D)
        pairs (measured on CPU), so about 15 L pairs per block."""
        blk = self.cfg.block
        nb = -(-L // blk)
        band = nb * blk * (blk + W - 1) * 1.3
        loop = sum(blk * min((b + 1) * blk, blk + W - 1) for b in range(nb)) + nb * 15 * L
        return band < loop

    def _banded(self, q_BHLD, k_BHSD, v_BHSD, position, W: int, z_H):
        """Queries in blocks of `blk`; block b attends to the W - 1 + blk keys ending at its last
        query, taken as overlapping windows (unfold) of the keys padded with W - 1 zeros in
        front. The windows are copies, O(L x (W + blk)) like the scores themselves, and their
        gradients are folded back in one operation."""
        dropout = self.attn_dropout
        B, H, L, D = q_BHLD.shape
        blk = self.cfg.block
        nb = -(-L // blk)
        pad_end = nb * blk - L
        z_H = z_H.to(q_BHLD.dtype)
        K = blk + W - 1

        def windows(t_BHSD):  # B H nb K D
            padded = F.pad(t_BHSD, (0, 0, W - 1, pad_end))
            return padded.unfold(2, K, blk).transpose(-1, -2)

        # Blocks become batch entries (4-D inputs, so that SDPA may pick its fused CPU kernel).
        q = F.pad(q_BHLD, (0, 0, 0, pad_end)).view(B, H, nb, blk, D).transpose(1, 2)  # B nb H blk D
        k, v = windows(k_BHSD).transpose(1, 2), windows(v_BHSD).transpose(1, 2)  # B nb H K D
        # Within a window, query i (0-based in its block) and key j are W - 1 + i - j apart.
        i = torch.arange(blk, device=q_BHLD.device)
        j = torch.arange(K, device=q_BHLD.device)
        steady = self._mask(z_H, position, i + W - 1, j, W)  # H blk K
        # The first blocks' windows reach into the padding (keys before position 0).
        n_head = min(nb, -(-(W - 1) // blk))
        outs = []
        if n_head:
            first_key = torch.arange(n_head, device=q_BHLD.device)[:, None] * blk + j[None, :] - (W - 1)  # n_head K
            head = steady[None].masked_fill((first_key < 0)[:, None, None, :], float("-inf"))  # n_head H blk K
            head = head[None].expand(B, -1, -1, -1, -1).reshape(B * n_head, H, blk, K)
            outs.append(F.scaled_dot_product_attention(
                *(t[:, :n_head].reshape(B * n_head, H, -1, D) for t in (q, k, v)),
                attn_mask=head, dropout_p=dropout).view(B, n_head, H, blk, D))
        if nb > n_head:
            rest = nb - n_head
            outs.append(F.scaled_dot_product_attention(
                *(t[:, n_head:].reshape(B * rest, H, -1, D) for t in (q, k, v)),
                # 4-D mask: without a gradient (evaluation, generation) SDPA takes its fused CPU kernel
                attn_mask=steady[None], dropout_p=dropout).view(B, rest, H, blk, D))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # B nb H blk D
        return out.transpose(1, 2).reshape(B, H, nb * blk, D)[:, :, :L]

    def _mask(self, z_H, position, q_pos, k_pos, W):
        """The additive mask of one block of queries: log m_z, causal, the window, any bias. H l K."""
        dist = q_pos[:, None] - k_pos[None, :]
        mask = log_span_mask(z_H, dist, self.ramp).masked_fill(dist >= W, float("-inf"))
        if position.has_score_bias:
            mask = mask + position.score_bias(q_pos, k_pos).to(mask.dtype)
        return mask

    def _flex(self, q_BHLD, k_BHSD, v_BHSD, inp):
        L, S = q_BHLD.shape[2], k_BHSD.shape[2]
        W = self.window()
        block_mask = causal_block_mask(L, S, str(q_BHLD.device), W)
        position = inp.position
        z_H, ramp = self.head_spans(inp).to(q_BHLD.dtype), float(self.ramp)
        bias = position.score_mod() if position.has_score_bias else None

        def span_mod(score, b, h, q_idx, kv_idx):
            m = ((ramp + z_H[h] - (q_idx - kv_idx)) / ramp).clamp(max=1.0)
            s = torch.where(m > 0, score + torch.log(m.clamp(min=1e-30)), float("-inf"))
            return s if bias is None else bias(s, b, h, q_idx, kv_idx)

        return flex_fn(q_BHLD.is_cuda)(q_BHLD, k_BHSD, v_BHSD, score_mod=span_mod, block_mask=block_mask)

    def reference(self, q_BHLD, k_BHSD, v_BHSD, inp):
        """The paper's form over all keys: softmax, multiply by m_z, renormalise."""

        def soft_mask(dist_LS, dtype):
            z_H = self.head_spans(inp).to(dtype)
            raw = (self.ramp + z_H[:, None, None] - dist_LS.to(dtype)) / self.ramp
            # clamp to [0, 1]; exactly at m = 0 the derivative is taken from below (0), as in the
            # log form of the fast paths (it matters only at ties, such as z = 0 at initialisation).
            return torch.where(raw > 0, raw.clamp(max=1.0), torch.zeros_like(raw))

        return dense_attention(q_BHLD, k_BHSD, v_BHSD, inp, dropout=self.attn_dropout, weights=soft_mask)
