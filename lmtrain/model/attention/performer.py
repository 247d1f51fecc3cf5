"""Performer's FAVOR+ (Choromanski et al., ICLR 2021): softmax attention through positive
orthogonal random features.

    exp(q . k / sqrt(D)) = E_w[ phi(q') . phi(k') ],   q' = q D^-1/4,  k' = k D^-1/4
    phi(x) = exp(w_i . x - |x|^2 / 2) / sqrt(M),   i = 1..M,  w_i ~ N(0, I_D)   (their Lemma 1)

with the w_i drawn in orthogonal blocks (ORF, Section 2.4), one projection per layer shared
by its heads, redrawn every `redraw_interval` optimizer steps.

Stabilisers (exact: each multiplies all the weights of one query by the same constant, which
cancels between numerator and denominator, so no gradient flows through them):
  * queries: each query's exponents minus their maximum over features;
  * keys: the running maximum r_i = max_{j <= i, f} a_jf of the key exponents a. Key j's
    features are exp(a_j - r_j) and the cumulative log-decay is G = -r, so the weight of key
    j for query i is exp(a_j - r_i) <= 1: causal (no future key enters any query's output)
    and free of overflow however large the exponents grow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lmtrain.model.attention.base import ATTENTION
from lmtrain.model.attention.kernelized import KernelizedAttention, KernelizedConfig, RandomFeatures


@dataclass
class PerformerConfig(KernelizedConfig):
    kind: str = "performer"
    features: int = 256  # M, random features per head (256 for D = 64, about D ln D)
    redraw_interval: int = 1000  # optimizer steps between redraws; 0 keeps the first draw
    orthogonal: bool = True  # orthogonal random features (lower variance); False: iid Gaussian


def favor_features(x_BHLD: Tensor, w_MD: Tensor) -> Tensor:
    """The exponents a = w . x' - |x'|^2 / 2 of x' = x D^-1/4: B H L M."""
    x = x_BHLD * x_BHLD.shape[-1] ** -0.25
    return x @ w_MD.T.to(x.dtype) - 0.5 * (x * x).sum(-1, keepdim=True)


@ATTENTION.register("performer")
class PerformerAttention(KernelizedAttention):
    Config = PerformerConfig
    cfg: PerformerConfig

    def __init__(self, cfg: PerformerConfig, *, d_model: int, n_heads: int, dropout: float):
        super().__init__(cfg, d_model=d_model, n_heads=n_heads, dropout=dropout)
        self.features = RandomFeatures(cfg.features, self.head_dim, cfg.redraw_interval, cfg.orthogonal)

    @classmethod
    def check(cls, model) -> list[str]:
        reasons = super().check(model)
        cfg = model.attention
        if cfg.features < 1:
            reasons.append(f"model.attention.features={cfg.features}: must be at least 1")
        if cfg.redraw_interval < 0:
            reasons.append("model.attention.redraw_interval must be 0 (never) or positive")
        return reasons

    @classmethod
    def feature_count(cls, model) -> int:
        return model.attention.features

    @classmethod
    def projection_flops(cls, model) -> float:
        return 2 * 2 * model.attention.features * (model.d_model // model.n_heads)  # w . x for q and k

    def after_optimizer_step(self) -> None:
        self.features.step()

    @property
    def n_features(self) -> int:
        return self.features.m

    def feature_maps(self, q_BHLD, k_BHSD, carry=None):
        w = self.features.weight
        log_scale = -0.5 * math.log(self.features.m)  # the 1 / sqrt(M), inside the exp
        a_q = favor_features(q_BHLD, w)
        fq = (a_q - (a_q.amax(-1, keepdim=True).detach() - log_scale)).exp()
        a_k = favor_features(k_BHSD, w)
        r_BHS = a_k.detach().amax(-1).cummax(-1).values  # running max over keys and features
        if carry is not None:  # and over the earlier segments of the sequence
            r_BHS = torch.maximum(r_BHS, carry[..., None])
        fk = (a_k - (r_BHS[..., None] - log_scale)).exp()
        return fq, fk, -r_BHS, r_BHS[..., -1]
