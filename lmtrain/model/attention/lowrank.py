"""Causal low-rank attention in the style of the Long-Short Transformer (Zhu et al. 2021).

The sequence is cut into segments of `segment` positions (c). A query attends, in one
softmax, to

  * the keys of its own segment up to itself, exactly (short range), and
  * `slots` (r) compressed keys and values of every *completed* earlier segment u:
    K~_u = P_u K_u, V~_u = P_u V_u with P_u an r x c map (long range).

With `slots: 0` only the own segment remains: the window-only baseline of the same kernel.

Compression (`compress`):
  * static  - P is a learned r x c matrix per head, the same for every segment, initialised
              to average pooling over c / r consecutive positions (with r = c, the identity:
              then the kernel is exactly full causal attention, the oracle test);
  * dynamic - P_u = softmax over the segment's positions of K_u W (W: D x r per head,
              initialised normal with std 1/sqrt(D): a zero W would make the r slots the
              same average, and equal slots get equal gradients forever), the
              content-dependent projection of the paper, computed from the keys.

Linformer's projection of the sequence axis (K' = E K over all L positions) mixes future
positions into every slot, so it cannot serve a decoder; a test keeps that counterexample.
Here a slot only mixes positions of a segment that is complete before the query's segment
starts, so the kernel is causal.

Cost: L (c + r L / c) scores, O(L^2 r / c): linear in L up to the point where the summaries
outnumber the segment (L > c^2 / r).

Paths:
  * segments - query blocks of whole segments through SDPA, each over the summaries of all
               earlier segments and its own segments' raw keys, with a mask; no L x S
               buffer (SDPA's fused kernel keeps no probabilities for the backward).
  * cached   - decoding with a KV cache: the summaries of finished segments live in the
               cache's state for this call site, the cache keeps only the open segment's
               raw keys (`cache_keep`), so decoding memory is r per finished segment plus c.
  * reference - the dense formula: all summaries and raw keys, masked, one softmax.

Shapes: B batch, H heads, L queries, S keys, D head dim, N segments, C segment, R slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmtrain.model.attention.base import ATTENTION, AttentionConfig, AttentionKernel, Capabilities

COMPRESSIONS = ("static", "dynamic")


@dataclass
class LowRankCausalConfig(AttentionConfig):
    kind: str = "lowrank_causal"
    segment: int = 256  # positions per segment: each query sees its own segment's keys exactly
    slots: int = 8  # compressed keys per completed earlier segment (at most `segment`; 0: own segment only)
    compress: str = "static"  # static (a learned slots x segment map per head) | dynamic (softmax of keys)
    block: int = 1024  # queries per SDPA call on the segments path (rounded to whole segments)
    backend: str = "auto"  # auto: segments for full sequences, cached for decoding steps


def pooling(r: int, c: int) -> Tensor:
    """r x c average pooling over consecutive groups of positions (the identity when r = c)."""
    if r == 0:
        return torch.zeros(0, c, dtype=torch.float64)
    group = (torch.arange(c) * r) // c  # which slot each position feeds
    m = (group[None, :] == torch.arange(r)[:, None]).double()
    return m / m.sum(dim=1, keepdim=True)


@ATTENTION.register("lowrank_causal")
class LowRankCausalAttention(AttentionKernel):
    Config = LowRankCausalConfig
    caps = Capabilities(score_bias=False, kv_cache=True, query_rows=False, document_mask=False)
    refusals = {"score_bias": "a compressed slot mixes the keys of a whole segment and has no single distance "
                              "to add a bias for",
                "document_mask": "a segment's summary mixes the documents inside it",
                "query_rows": "queries go in whole segments"}
    backends = ("segments", "cached")
    test_options = {"segment": 8, "slots": 2, "block": 16}

    cfg: LowRankCausalConfig

    def __init__(self, cfg: LowRankCausalConfig, *, d_model: int, n_heads: int, dropout: float, layer: int = 0):
        super().__init__(cfg, d_model=d_model, n_heads=n_heads, dropout=dropout, layer=layer)
        r, c = cfg.slots, cfg.segment
        if cfg.compress == "dynamic":
            self.proj = nn.Parameter(torch.empty(n_heads, self.head_dim, r))
        else:
            self.proj = nn.Parameter(torch.empty(n_heads, r, c))
        self.init_parameters()

    @classmethod
    def check(cls, a) -> list[str]:
        reasons = super().check(a)
        cfg = a.model.attention
        if cfg.segment < 1:
            reasons.append("model.attention.segment must be at least 1")
        if not 0 <= cfg.slots <= max(cfg.segment, 1):
            reasons.append(f"model.attention.slots={cfg.slots}: use 0 (own segment only) to model.attention.segment="
                           f"{cfg.segment} (more slots than positions compress nothing)")
        if cfg.compress not in COMPRESSIONS:
            reasons.append(f"model.attention.compress={cfg.compress!r}: choose one of {', '.join(COMPRESSIONS)}")
        if cfg.block < 1:
            reasons.append("model.attention.block must be at least 1")
        return reasons

    @classmethod
    def own_parameters(cls, a) -> int:
        cfg, m = a.model.attention, a.model
        per_head = (m.d_model // m.n_heads) * cfg.slots if cfg.compress == "dynamic" else cfg.slots * cfg.segment
        return m.n_heads * per_head

    @classmethod
    def attention_flops(cls, model, seq_len: int) -> float:
        """Each query scores about half its segment and the slots of the segments before it:
        12 d (c + r (L / c - 1) / 2 x 2) in softmax's both-halves convention."""
        cfg = model.attention
        c, r = min(cfg.segment, seq_len), cfg.slots
        return 12.0 * model.d_model * (c + r * max(seq_len // cfg.segment - 1, 0))

    @torch.no_grad()
    def init_parameters(self) -> None:
        if self.cfg.compress == "dynamic":
            self.proj.normal_(0.0, self.head_dim ** -0.5)
        else:
            self.proj.copy_(pooling(self.cfg.slots, self.cfg.segment).expand_as(self.proj))

    def cache_keep(self, k_pos: Tensor, next_pos: int) -> Optional[Tensor]:
        """The open segment's raw keys; finished segments live on as summaries (the cache state).
        The reference path recomputes summaries from raw keys: it keeps them all."""
        if self.cfg.backend == "reference":
            return None
        return k_pos // self.cfg.segment == next_pos // self.cfg.segment

    # -- compression -------------------------------------------------------------------------
    def summaries(self, k_BHSD: Tensor, v_BHSD: Tensor) -> tuple[Tensor, Tensor]:
        """B x H x N*R compressed keys and values of the N = S // c complete segments of keys that
        start at a segment boundary."""
        B, H, S, D = k_BHSD.shape
        c, r = self.cfg.segment, self.cfg.slots
        N = S // c
        k, v = (t[:, :, : N * c].reshape(B, H, N, c, D) for t in (k_BHSD, v_BHSD))
        if self.cfg.compress == "dynamic":
            w = torch.softmax(torch.einsum("bhncd,hdr->bhnrc", k, self.proj.to(k.dtype)), dim=-1)
        else:
            w = self.proj.to(k.dtype)[None, :, None]  # 1 H 1 R C
        return (torch.einsum("bhnrc,bhncd->bhnrd", w.expand(B, H, N, r, c), k).reshape(B, H, N * r, D),
                torch.einsum("bhnrc,bhncd->bhnrd", w.expand(B, H, N, r, c), v).reshape(B, H, N * r, D))

    def _mask(self, q_pos: Tensor, k_pos: Tensor, n_summaries: int, first_segment: int = 0) -> Tensor:
        """l x (n_summaries + s): summary slots of segments before the query's, then raw keys of
        its own segment up to itself. Summaries start at segment `first_segment`."""
        c, r = self.cfg.segment, self.cfg.slots
        seg_q = q_pos // c
        slot_seg = first_segment + torch.arange(n_summaries, device=q_pos.device) // r
        raw = (k_pos[None, :] // c == seg_q[:, None]) & (k_pos[None, :] <= q_pos[:, None])
        return torch.cat((slot_seg[None, :] < seg_q[:, None], raw), dim=1)

    # -- paths ----------------------------------------------------------------------------
    def auto_backend(self, q_BHLD, k_BHSD, inp) -> str:
        return "segments" if inp.aligned and inp.cache_state is None else "cached"

    def route(self, q_BHLD, k_BHSD, inp) -> str:
        path = super().route(q_BHLD, k_BHSD, inp)
        return "cached" if (not inp.aligned or inp.cache_state is not None) and path != "reference" else path

    def fast(self, path, q_BHLD, k_BHSD, v_BHSD, inp):
        if path == "cached":
            return self._cached(q_BHLD, k_BHSD, v_BHSD, inp)
        return self._segments(q_BHLD, k_BHSD, v_BHSD, inp)

    def _segments(self, q_BHLD, k_BHSD, v_BHSD, inp):
        L = q_BHLD.shape[2]
        c, r = self.cfg.segment, self.cfg.slots
        sk, sv = self.summaries(k_BHSD, v_BHSD)
        pos = inp.k_pos
        block = max(1, self.cfg.block // c) * c
        # Pieces by split, not slices: a slice's backward writes a full-size zero tensor per block.
        sk, sv = (sk.split(r, dim=2), sv.split(r, dim=2)) if r else ((), ())  # per segment
        qs, ks, vs = (t.split(block, dim=2) for t in (q_BHLD, k_BHSD, v_BHSD))
        outs = []
        for b, s0 in enumerate(range(0, L, block)):
            s1 = min(L, s0 + block)
            n_seg = (s1 - 1) // c if r else 0  # the segments before the block's last one
            keys = torch.cat((*sk[:n_seg], ks[b]), dim=2)
            values = torch.cat((*sv[:n_seg], vs[b]), dim=2)
            mask = self._mask(pos[s0:s1] - pos[0], pos[s0:s1] - pos[0], n_seg * r)
            outs.append(F.scaled_dot_product_attention(qs[b], keys, values, attn_mask=mask,
                                                       dropout_p=self.attn_dropout))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _cached(self, q_BHLD, k_BHSD, v_BHSD, inp):
        """New queries over the cache: summaries of finished segments from the cache state (plus
        any segment the new keys complete), raw keys of the open segments."""
        c = self.cfg.segment
        state = inp.cache_state if inp.cache_state is not None else {}
        done = state.get("done", 0)  # segments summarised so far
        k_pos = inp.k_pos
        # Summarise every complete segment the raw keys hold beyond `done` (keys are contiguous).
        first = done * c - int(k_pos[0])  # index of the first unsummarised position
        if first < 0:
            raise RuntimeError("lowrank_causal: the KV cache dropped keys of a segment it had not summarised")
        complete = (k_BHSD.shape[2] - first) // c
        if complete > 0:
            nk, nv = self.summaries(k_BHSD[:, :, first:first + complete * c], v_BHSD[:, :, first:first + complete * c])
            state["k"] = nk if "k" not in state else torch.cat((state["k"], nk), dim=2)
            state["v"] = nv if "v" not in state else torch.cat((state["v"], nv), dim=2)
            done = state["done"] = done + complete
        sk = state.get("k", k_BHSD[:, :, :0])
        sv = state.get("v", v_BHSD[:, :, :0])
        keys, values = torch.cat((sk, k_BHSD), dim=2), torch.cat((sv, v_BHSD), dim=2)
        mask = self._mask(inp.q_pos, k_pos, sk.shape[2])
        return F.scaled_dot_product_attention(q_BHLD, keys, values, attn_mask=mask, dropout_p=self.attn_dropout)

    def reference(self, q_BHLD, k_BHSD, v_BHSD, inp):
        """softmax over [summaries of the complete earlier segments ; own segment's keys up to the
        query] of q k^T / sqrt(D), in float32 at least, from all S keys (positions from 0)."""
        dtype = q_BHLD.dtype
        q, k, v = (t.to(torch.promote_types(t.dtype, torch.float32)) for t in (q_BHLD, k_BHSD, v_BHSD))
        p0 = int(inp.k_pos[0])
        if p0 % self.cfg.segment:
            raise ValueError("lowrank_causal's reference needs keys from a segment boundary")
        sk, sv = self._summaries_in(k, v, self.proj)
        keys, values = torch.cat((sk, k), dim=2), torch.cat((sv, v), dim=2)
        scores = q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])
        mask = self._mask(inp.q_pos - p0, inp.k_pos - p0, sk.shape[2])
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = F.dropout(scores.softmax(dim=-1), p=self.attn_dropout, training=self.attn_dropout > 0)
        return (probs @ values).to(dtype)

    def _summaries_in(self, k, v, proj):
        """Summaries segment by segment (the reference's own compression, no batched einsum)."""
        c = self.cfg.segment
        N = k.shape[2] // c
        sk, sv = [], []
        for u in range(N):
            ku, vu = k[:, :, u * c:(u + 1) * c], v[:, :, u * c:(u + 1) * c]  # B H C D
            if self.cfg.compress == "dynamic":
                w = torch.softmax(ku @ proj.to(k.dtype), dim=2).transpose(-1, -2)  # B H R C
            else:
                w = proj.to(k.dtype)[None]  # 1 H R C
            sk.append(w @ ku)
            sv.append(w @ vu)
        empty = k[:, :, :0]
        return (torch.cat(sk, dim=2) if sk else empty), (torch.cat(sv, dim=2) if sv else empty)

