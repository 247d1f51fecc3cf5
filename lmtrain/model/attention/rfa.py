"""Random Feature Attention (Peng et al., ICLR 2021): random Fourier features, optionally gated.

Queries and keys are l2-normalised per head; with w ~ N(0, diag(s^2)),

    phi(x) = [sin(w_1 . x), ..., sin(w_M . x), cos(w_1 . x), ..., cos(w_M . x)] / sqrt(M)
    E[phi(x) . phi(y)] = exp(-|s * (x - y)|^2 / 2) = exp(-s^2) exp(s^2 x . y)   (|x| = |y| = 1, scalar s)

(their Eq. 2-4; Rahimi and Recht 2007), so attention follows a softmax with inverse
temperature s^2, learned per head and dimension (`learn_scale`; RFA learns the variance of
the features the same way). The projection is drawn as for the Performer (orthogonal blocks,
seeded, redrawn every `redraw_interval` steps; RFA redraws every step in training).

Gate (their Eq. 7, `gate: true`): a per-head scalar g_t = sigmoid(w_h . k_t + b_h) from the
head's key, with the causal state updated as S_t = g_t S_{t-1} + (1 - g_t) phi(k_t) v_t^T
(and the denominator's state alike), a learned recency bias. As a decay: key features
times (1 - g_t), cumulative log-decay G = cumsum log g. (The paper computes g_t from the
layer input x_t; the head's key is a linear function of x_t, which keeps the gate inside the
kernel interface.)

The features can be negative, so the estimated denominator can approach 0 or change sign:
its magnitude is kept at least `eps`, with its sign.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from lmtrain.model.attention.base import ATTENTION
from lmtrain.model.attention.kernelized import RandomFeatureAttention, RandomFeatureConfig


@dataclass
class RFAConfig(RandomFeatureConfig):
    kind: str = "rfa"
    features: int = 128  # M frequencies per head (2M features: sin and cos)
    # s at initialisation (softmax inverse temperature s^2 on unit q, k). Larger s sharpens attention
    # but raises the variance of the estimate, whose denominator can then approach 0.
    init_scale: float = 1.0
    learn_scale: bool = True  # learn the random features' scale per head and dimension
    gate: bool = False  # RFA's recency gate (their Eq. 7): a learned per-head forget gate
    gate_bias_init: float = 2.0  # b_h: g = sigmoid(2) = 0.88 at initialisation
    eps: float = 1e-4  # smallest magnitude of the denominator


@ATTENTION.register("rfa")
class RFAAttention(RandomFeatureAttention):
    Config = RFAConfig
    signed_features = True
    features_per_projection = 2  # sin and cos
    caps = replace(RandomFeatureAttention.caps, head_shards=False)
    refusals = {**RandomFeatureAttention.refusals,
                "head_shards": "its per-head feature scales and gates are not split across processes yet"}
    cfg: RFAConfig

    init_options = {"init_scale": ("log_scale", lambda cfg: math.log(cfg.init_scale)),
                    "gate_bias_init": ("gate_bias", lambda cfg: cfg.gate_bias_init)}
    test_options = {"gate": True, "features": 32}

    def __init__(self, cfg: RFAConfig, *, d_model: int, n_heads: int, dropout: float, layer: int = 0):
        super().__init__(cfg, d_model=d_model, n_heads=n_heads, dropout=dropout, layer=layer)
        H, D = n_heads, self.head_dim
        self.log_scale = nn.Parameter(torch.empty(H, D), requires_grad=cfg.learn_scale)
        if cfg.gate:
            self.gate_weight = nn.Parameter(torch.empty(H, D))
            self.gate_bias = nn.Parameter(torch.empty(H))
        self.init_parameters()

    @classmethod
    def own_parameters(cls, a) -> int:
        H, D = a.model.n_heads, a.model.d_model // a.model.n_heads
        return H * D + (H * D + H if a.model.attention.gate else 0)  # log s; the gate's weight and bias

    @torch.no_grad()
    def init_parameters(self) -> None:
        """s = init_scale for every head and dimension; the gate starts at sigmoid(gate_bias_init)
        whatever the key (zero weights)."""
        self.log_scale.fill_(math.log(self.cfg.init_scale))
        if self.cfg.gate:
            self.gate_weight.zero_()
            self.gate_bias.fill_(self.cfg.gate_bias_init)

    @classmethod
    def check(cls, a) -> list[str]:
        reasons = super().check(a)
        cfg = a.model.attention
        if cfg.init_scale <= 0:
            reasons.append("model.attention.init_scale must be positive")
        if cfg.eps <= 0:
            reasons.append("model.attention.eps must be positive")
        return reasons

    def _phi(self, x_BHLD):
        x = F.normalize(x_BHLD, dim=-1) * self.log_scale.exp().to(x_BHLD.dtype)[:, None, :]
        arg = x @ self.features.weight.T.to(x.dtype)  # B H L M
        return torch.cat((arg.sin(), arg.cos()), dim=-1) * self.features.m ** -0.5

    def feature_maps(self, q_BHLD, k_BHSD, carry=None):
        fq, fk = self._phi(q_BHLD), self._phi(k_BHSD)
        if not self.cfg.gate:
            return fq, fk, None, None
        logit_BHS = (k_BHSD * self.gate_weight.to(k_BHSD.dtype)[:, None, :]).sum(-1) + self.gate_bias[:, None]
        g_BHS = F.logsigmoid(logit_BHS).cumsum(-1)
        if carry is not None:  # G continues from the earlier segments of the sequence
            g_BHS = g_BHS + carry[..., None]
        fk = fk * torch.sigmoid(-logit_BHS)[..., None]  # 1 - g_t
        return fq, fk, g_BHS, g_BHS[..., -1]
