"""Linear attention with the elu + 1 feature map (Katharopoulos et al., ICML 2020,
"Transformers are RNNs"): phi(x) = elu(x) + 1 > 0, M = D features, no randomness.
The baseline the random-feature kinds are measured against."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from lmtrain.model.attention.base import ATTENTION
from lmtrain.model.attention.kernelized import KernelizedAttention, KernelizedConfig


@dataclass
class LinearConfig(KernelizedConfig):
    kind: str = "linear"


@ATTENTION.register("linear")
class LinearAttention(KernelizedAttention):
    Config = LinearConfig
    cfg: LinearConfig

    def feature_maps(self, q_BHLD, k_BHSD, carry=None):
        return F.elu(q_BHLD) + 1, F.elu(k_BHSD) + 1, None, None
