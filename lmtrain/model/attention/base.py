"""The one interface every attention kernel implements.

A kernel gets queries, keys and values that the attention block has already projected
and (for RoPE) rotated, plus the absolute positions of the queries and keys, and returns
the attended values. It is always causal: key j is visible to query i iff k_pos[j] <= q_pos[i].
That rule covers training (q_pos == k_pos) and decoding with a KV cache (q_pos are the
new positions, k_pos all cached ones) with no special cases. Kernels that declare
`supports_query_rows` also accept per-row query positions (q_pos of shape B x L): a
different subset of the positions in each row, as ACT asks for its running positions.

Kernels declare what they support; `check` turns a config into a list of reasons to
refuse it, which the config loader reports before anything is built.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor, nn

from lmtrain.registry import KindConfig, Registry, Variant

if TYPE_CHECKING:
    from lmtrain.config import ModelConfig
    from lmtrain.model.outputs import Aux
    from lmtrain.model.positions import Position

ATTENTION: Registry[type["AttentionKernel"]] = Registry("model.attention.kind")


@dataclass
class AttentionConfig(KindConfig):
    """Options common to every kind; each kind subclasses it with its own."""

    kind: str = "softmax"


class AttentionKernel(Variant, nn.Module):
    Config = AttentionConfig

    # Declared capabilities, asked before anything is built.
    supports_score_bias: bool = False  # additive biases such as ALiBi
    supports_kv_cache: bool = False  # incremental decoding in `generate`
    supports_query_rows: bool = False  # q_pos_L may be B x L (a subset of queries per row)
    deterministic_recompute: bool = True  # same output when rerun with the same RNG state
    score_bias_refusal: str = ""  # why a kind without supports_score_bias refuses one, for the error

    def __init__(self, cfg: AttentionConfig, *, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.cfg = cfg
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        # Which code path ran, counted; tests use it to prove a fast path really ran.
        self.path_counts: Counter[str] = Counter()
        # Route every call through `reference` (tests compare the two on the same weights).
        self.force_reference = False
        self.layer_index = 0  # set by the attention block; names per-layer statistics

    def after_optimizer_step(self) -> None:
        """Called by the trainer after every optimizer step (projections, clamps)."""

    def parameter_losses(self) -> dict[str, Tensor]:
        """Loss terms of this kernel's own parameters alone (adaptive span's span loss), added
        once per forward pass. Kernels add them from `forward`; wirings that run the forward
        without a graph (reversible) add them again, with one."""
        return {}

    def head_stats(self) -> dict[str, Tensor]:
        """Learned per-head quantities worth watching (name -> H values), e.g. adaptive spans.
        Logged to TensorBoard per layer and head, and printed by `lmtrain inspect`."""
        return {}

    def head_stat_limits(self) -> dict[str, float]:
        """The largest value each head stat can take (for plots and percentages)."""
        return {}

    @classmethod
    def check(cls, model: "ModelConfig") -> list[str]:
        """Reasons this kind cannot run with `model` (empty when it can)."""
        from lmtrain.model.positions import POSITIONS

        reasons = []
        if model.position in POSITIONS and POSITIONS.get(model.position).has_score_bias:
            if not cls.supports_score_bias:
                why = f" ({cls.score_bias_refusal})" if cls.score_bias_refusal else ""
                reasons.append(
                    f"model.attention.kind={model.attention.kind} cannot apply the additive score "
                    f"bias of model.position={model.position}{why}; use position rope or none"
                )
        return reasons

    @classmethod
    def attention_flops(cls, model: "ModelConfig", seq_len: int) -> float:
        """Training FLOPs per token of one layer's kernel (forward + backward = 3 x forward),
        beyond the projections. Softmax: 2 L d for the scores and 2 L d for the values of a
        full L x L product (PaLM's convention), so 12 L d."""
        return 12.0 * model.d_model * seq_len

    def forward(self, q_BHLD: Tensor, k_BHSD: Tensor, v_BHSD: Tensor, *, position: "Position", q_pos_L: Tensor,
                k_pos_S: Tensor, aux: "Aux") -> Tensor:
        kw = dict(position=position, q_pos_L=q_pos_L, k_pos_S=k_pos_S, aux=aux)
        if self.force_reference:
            self.path_counts["reference"] += 1
            return self.reference(q_BHLD, k_BHSD, v_BHSD, **kw)
        return self.fast(q_BHLD, k_BHSD, v_BHSD, **kw)

    def fast(self, q_BHLD: Tensor, k_BHSD: Tensor, v_BHSD: Tensor, *, position: "Position", q_pos_L: Tensor,
             k_pos_S: Tensor, aux: "Aux") -> Tensor:
        """The production path; counts the path it took in `path_counts`."""
        raise NotImplementedError

    def reference(
        self,
        q_BHLD: Tensor,
        k_BHSD: Tensor,
        v_BHSD: Tensor,
        *,
        position: "Position",
        q_pos_L: Tensor,
        k_pos_S: Tensor,
        aux: "Aux",
    ) -> Tensor:
        """The plain implementation the fast path is tested against."""
        raise NotImplementedError
