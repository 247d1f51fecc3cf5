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
from lmtrain.model.attention.kernelized import RandomFeatureAttention, RandomFeatureConfig


@dataclass
class PerformerConfig(RandomFeatureConfig):
    kind: str = "performer"
    features: int = 256  # M, random features per head (256 for D = 64, about D ln D)


def favor_features(x_BHLD: Tensor, w_MD: Tensor) -> Tensor:
    """The exponents a = w . x' - |x'|^2 / 2 of x' = x D^-1/4: B H L M."""
    x = x_BHLD * x_BHLD.shape[-1] ** -0.25
    return x @ w_MD.T.to(x.dtype) - 0.5 * (x * x).sum(-1, keepdim=True)


@ATTENTION.register("performer")
class PerformerAttention(RandomFeatureAttention):
    Config = PerformerConfig
    test_options = {"features": 32}
    cfg: PerformerConfig

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
