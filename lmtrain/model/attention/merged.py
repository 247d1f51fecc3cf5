"""A window plus the key blocks beyond it (CPU): BigBird, window+globals and other unions
that contain a window of W in every head group.

The window runs on the band (band.py: flash attention per chunk of W queries, no mask, no
gather). The keys beyond it (global blocks, random blocks, global queries' prefixes) are
gathered per query block and head, only where the pattern marks them (`SparsePlan.layout_beyond`),
and run through the same flash kernel, with no mask where every pair of a group is visible
(BigBird's random blocks, global blocks far from the diagonal) and a float mask elsewhere.
The two parts are merged exactly by their log-sum-exps inside one autograd Function; in
backward each part's flash backward runs with the merged output and log-sum-exp (its exact
share, as in the band), and the gathered keys' gradients are scattered back once.

Shapes: B batch, H heads, L positions (a multiple of W, itself a multiple of T), D head dim,
T block, G query blocks of a group, C key blocks per query block, H' heads of the layout
(1 when every head shares it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from lmtrain.model.attention import band


@dataclass
class ExtraGroup:
    """Query blocks with the same number C of key blocks beyond the window."""

    qsel: Tensor  # G query blocks
    kidx: Tensor  # H' x G x C key blocks
    visible: Optional[Tensor]  # H' x G x T x CT pairs beyond the window that are visible; None: all
    empty: Optional[Tensor]  # H' x G x T rows with no such key; None: none
    masks: dict = field(default_factory=dict)  # dtype -> additive float mask (0 / -inf)

    def mask(self, dtype) -> Optional[Tensor]:
        if self.visible is None:
            return None
        if dtype not in self.masks:
            zero = torch.zeros((), dtype=dtype, device=self.visible.device)
            self.masks[dtype] = zero.masked_fill(~self.visible, float("-inf")).expand(self.visible.shape).contiguous()
        return self.masks[dtype]


def _flat_index(kidx: Tensor, B: int, H: int, nb: int) -> Tensor:
    """H' x G x C key blocks -> (B H G C) rows of a (B H nb) x T x D view."""
    base = (torch.arange(B * H, device=kidx.device) * nb).view(B, H, 1, 1)
    return (base + kidx[None]).reshape(-1)


def _gather(x: Tensor, flat: Tensor, B: int, H: int, G: int, C: int) -> Tensor:
    """x: (B H nb) x T x D -> (B H) x G x (C T) x D, the key blocks of `flat` (_flat_index)."""
    T, D = x.shape[-2:]
    return x.index_select(0, flat).view(B * H, G, C * T, D)


def _blocks(qsel: Tensor):
    """A slice when the query blocks are consecutive (views, no copies), else the index."""
    first, n = int(qsel[0]), len(qsel)
    return slice(first, first + n) if int(qsel[-1]) - first + 1 == n else qsel


def _bh(t: Optional[Tensor], B: int, H: int) -> Optional[Tensor]:
    """H' x ... -> (B H) x ... (a view for B = 1 or H' = 1)."""
    if t is None:
        return None
    if t.shape[0] == 1:
        return t
    return t if B == 1 else t.expand(B, *t.shape).reshape(B * H, *t.shape[1:])


class _BandExtras(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window: int, block: int, scale: float, groups: list[ExtraGroup]):
        fwd, _ = band._ops()
        B, H, L, D = q.shape
        W, T = window, block
        n, nb = L // W, L // T
        q4, k4, v4 = (t.reshape(B * H, n, W, D) for t in (q, k, v))
        out, lse, bmask = band.band_forward(q4, k4, v4, scale)
        out_t, lse_t = out.view(B * H, nb, T, D), lse.view(B * H, nb, T)
        q_t = q.view(B * H, nb, T, D)
        k_r, v_r = k.view(B * H * nb, T, D), v.view(B * H * nb, T, D)
        for g in groups:
            G, C = len(g.qsel), g.kidx.shape[-1]
            sel, flat = _blocks(g.qsel), _flat_index(g.kidx, B, H, nb)
            o, lg = fwd(q_t[:, sel], _gather(k_r, flat, B, H, G, C), _gather(v_r, flat, B, H, G, C), 0.0, False,
                        attn_mask=_bh(g.mask(q.dtype), B, H), scale=scale)
            if g.empty is not None:  # rows with no key here: the kernel reports lse 0, not -inf
                lg = lg.masked_fill(_bh(g.empty, B, H), float("-inf"))
            la = lse_t[:, sel]
            merged = torch.logaddexp(la, lg)
            o_a = out_t[:, sel]
            o_a.mul_(torch.exp(la - merged)[..., None]).add_(o.mul_(torch.exp(lg - merged)[..., None]))
            if not isinstance(sel, slice):
                out_t[:, sel] = o_a
            lse_t[:, sel] = merged
        ctx.save_for_backward(q4, k4, v4, out, lse, *(() if bmask is None else (bmask,)))
        ctx.groups, ctx.scale, ctx.dims = groups, scale, (B, H, L, D, W, T)
        return out.view(B, H, L, D)

    @staticmethod
    def backward(ctx, grad):
        _, bwd = band._ops()
        q4, k4, v4, out, lse, *bmask = ctx.saved_tensors
        B, H, L, D, W, T = ctx.dims
        nb = L // T
        g4 = grad.reshape(q4.shape)
        dq, dk, dv = band.band_backward(g4, q4, k4, v4, out, lse, bmask[0] if bmask else None, ctx.scale)
        q_t, dq_t = q4.view(B * H, nb, T, D), dq.view(B * H, nb, T, D)
        k_r, v_r = k4.reshape(B * H * nb, T, D), v4.reshape(B * H * nb, T, D)
        dk_r, dv_r = dk.view(B * H * nb, T * D), dv.view(B * H * nb, T * D)
        g_t, out_t, lse_t = g4.reshape(B * H, nb, T, D), out.view(B * H, nb, T, D), lse.view(B * H, nb, T)
        for g in ctx.groups:
            G, C = len(g.qsel), g.kidx.shape[-1]
            sel, flat = _blocks(g.qsel), _flat_index(g.kidx, B, H, nb)
            dqg, dkg, dvg = bwd(g_t[:, sel], q_t[:, sel], _gather(k_r, flat, B, H, G, C),
                                _gather(v_r, flat, B, H, G, C), out_t[:, sel], lse_t[:, sel], 0.0, False,
                                attn_mask=_bh(g.mask(q4.dtype), B, H), scale=ctx.scale)
            dq_t[:, sel] += dqg
            dk_r.index_add_(0, flat, dkg.reshape(-1, T * D))
            dv_r.index_add_(0, flat, dvg.reshape(-1, T * D))
        shape = (B, H, L, D)
        return dq.view(shape), dk.view(shape), dv.view(shape), None, None, None, None


def window_and_extras(q_BHLD: Tensor, k_BHLD: Tensor, v_BHLD: Tensor, window: int, block: int, scale: float,
                      groups: list[ExtraGroup]) -> Tensor:
    """Aligned q, k, v whose length is a multiple of `window` (a multiple of `block`)."""
    return _BandExtras.apply(q_BHLD.contiguous(), k_BHLD.contiguous(), v_BHLD.contiguous(), window, block, scale,
                             groups)
