"""The one interface every attention kernel implements.

    kernel(q_BHLD, k_BHSD, v_BHSD, inp: AttentionInputs) -> o_BHLD

A kernel gets queries, keys and values that the attention block has already projected
and (for RoPE) rotated, and one `AttentionInputs` with everything else a kernel may need:
the positional scheme, the absolute positions of the queries and keys, the aux collector,
and room for what is coming (document ids, global-token flags, a seed). Attention is always
causal: key j is visible to query i iff k_pos[j] <= q_pos[i]. That rule covers training
(q_pos == k_pos) and decoding with a KV cache (q_pos are the new positions, k_pos all cached
ones) with no special cases. Kernels that declare `caps.query_rows` also accept per-row query
positions (q_pos of shape B x L): a different subset of the positions in each row, as ACT
asks for its running positions.

A kernel declares, as class data:
  * `caps`        - what it supports (`Capabilities`), asked at config time;
  * `refusals`    - for a capability it lacks, why (it goes into the error message);
  * `backends`    - its selectable fast paths (`model.attention.backend`: auto, these, reference);
  * `tolerances`  - per dtype, how closely its fast paths match its reference;
  * `shared_qk`   - the keys are the queries (LSH): the block projects no keys.
It implements `route` (which path runs; `auto_backend` for backend=auto), `fast(path, ...)`
and `reference(...)`, the plain implementation its fast paths are tested against.

Optional lifecycle hooks (after the optimizer step, parameter losses, head statistics) are
protocols in lmtrain/model/hooks.py, which the decoder collects once; a kernel implements
the ones it needs and nothing else.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional

import torch
from torch import Tensor, nn

from lmtrain.registry import KindConfig, Registry, Variant

if TYPE_CHECKING:
    from lmtrain.model.outputs import Aux
    from lmtrain.model.positions import Position

ATTENTION: Registry[type["AttentionKernel"]] = Registry("model.attention")


@dataclass
class AttentionInputs:
    """Everything besides q, k and v that a kernel may read. Shapes: L queries, S keys."""

    position: "Position"  # the positional scheme: score bias, linear slopes, FlexAttention score_mod
    q_pos: Tensor  # L absolute positions of the queries, or B x L per row (caps.query_rows)
    k_pos: Tensor  # S absolute positions of the keys
    aux: "Aux"  # per-forward statistics a kernel reports
    doc_ids: Optional[Tensor] = None  # B x S document of each key (document masking); None: one document
    global_mask: Optional[Tensor] = None  # B x S, True for global tokens; None: none
    seed: Optional[int] = None  # for kernels whose pattern is drawn per forward
    # With a KV cache: this call site's own state across decoding steps (lowrank_causal keeps the
    # summaries of finished segments there); None without a cache.
    cache_state: Optional[dict] = None
    # Sequence parallelism: q, k and v are these heads of the model (a kernel with per-head
    # parameters uses theirs; `caps.head_shards`). None: all of them.
    heads: Optional[slice] = None

    @property
    def per_row(self) -> bool:
        return self.q_pos.dim() == 2

    @property
    def aligned(self) -> bool:
        """Queries and keys are the same positions (training, full-sequence evaluation)."""
        return not self.per_row and self.q_pos.shape[0] == self.k_pos.shape[0]


@dataclass(frozen=True)
class Capabilities:
    score_bias: bool = False  # applies additive score biases (ALiBi)
    kv_cache: bool = False  # incremental decoding in `generate` (else: full recompute)
    query_rows: bool = False  # q_pos may be B x L (a subset of queries per row)
    deterministic_recompute: bool = True  # the same output when rerun with the same RNG state
    document_mask: bool = False  # honours AttentionInputs.doc_ids
    global_tokens: bool = False  # honours AttentionInputs.global_mask
    # Its math is per head and it runs on any contiguous subset of the heads (AttentionInputs.heads):
    # sequence parallelism (Ulysses) hands each process all positions of some of the heads.
    head_shards: bool = False


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float


# How closely a fast path matches the reference on random inputs, outputs and gradients.
DEFAULT_TOLERANCES = {
    torch.float64: Tolerance(1e-9, 1e-9),
    torch.float32: Tolerance(2e-4, 2e-5),
    torch.bfloat16: Tolerance(2e-2, 2e-2),
    torch.float16: Tolerance(5e-3, 5e-3),
}

_REFERENCE = contextvars.ContextVar("lmtrain_attention_reference", default=False)


@contextlib.contextmanager
def reference_paths(enabled: bool = True):
    """Route every kernel call through its `reference` (tests compare the two on the same weights)."""
    token = _REFERENCE.set(enabled)
    try:
        yield
    finally:
        _REFERENCE.reset(token)


_DECISIONS = contextvars.ContextVar("lmtrain_attention_decisions", default=None)


@contextlib.contextmanager
def kept_decisions(store: dict, replay: bool):
    """Keep the discrete decisions kernels make in a forward (LSH's buckets) in `store`, or,
    with `replay`, give them back: a recompute (reversible layers' backward) whose inputs
    differ from the forward's in the last bits then attends exactly as the forward did."""
    token = _DECISIONS.set((store, replay))
    try:
        yield
    finally:
        _DECISIONS.reset(token)


def decide(kernel: nn.Module, make):
    """`make()`, kept for a replay under `kept_decisions` (one decision per kernel and call)."""
    slot = _DECISIONS.get()
    if slot is None:
        return make()
    store, replay = slot
    if replay and kernel in store:
        return store[kernel]
    store[kernel] = value = make()
    return value


@dataclass
class AttentionConfig(KindConfig):
    """Options every kind has; each kind subclasses it with its own."""

    kind: str = "softmax"
    backend: str = "auto"  # auto, one of the kind's `backends`, or reference


class AttentionKernel(Variant, nn.Module):
    Config = AttentionConfig
    caps: ClassVar[Capabilities] = Capabilities()
    refusals: ClassVar[dict[str, str]] = {}
    backends: ClassVar[tuple[str, ...]] = ()
    backends_without_dropout: ClassVar[tuple[str, ...]] = ("flex",)
    tolerances: ClassVar[dict[torch.dtype, Tolerance]] = DEFAULT_TOLERANCES
    # Shared query-key attention: the block projects no keys and passes the queries as k.
    shared_qk: ClassVar[bool] = False

    def __init__(self, cfg: AttentionConfig, *, d_model: int, n_heads: int, dropout: float, layer: int = 0):
        super().__init__()
        self.cfg = cfg
        self.layer = layer  # which layer this kernel serves (patterns may differ by layer)
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        # Which path ran, counted: tests use it to prove that a fast path really ran.
        self.path_counts: Counter[str] = Counter()

    @property
    def attn_dropout(self) -> float:
        return self.dropout if self.training else 0.0

    @classmethod
    def check(cls, a) -> list[str]:
        """Reasons this kind cannot run with the assembly `a` (empty when it can)."""
        from lmtrain.model.positions import POSITIONS

        m, cfg, reasons = a.model, a.model.attention, []
        choices = ("auto", *cls.backends, "reference")
        if cfg.backend not in choices:
            reasons.append(f"model.attention.backend={cfg.backend!r}: choose one of {', '.join(choices)}")
        elif cfg.backend in cls.backends_without_dropout and m.dropout > 0:
            reasons.append(f"model.attention.backend={cfg.backend} does not support dropout; set model.dropout=0 "
                           "or model.attention.backend=auto")
        if a.position.has_score_bias and not cls.caps.score_bias:
            why = f" ({cls.refusals['score_bias']})" if "score_bias" in cls.refusals else ""
            plain = ", ".join(k for k, p in POSITIONS.items() if not p.has_score_bias)
            reasons.append(f"model.attention.kind={cfg.kind} cannot apply the additive score bias of "
                           f"model.position.kind={m.position.kind}{why}; use a scheme without one ({plain})")
        return reasons

    @classmethod
    def head_shard_refusal(cls, a) -> Optional[str]:
        """Why this kind cannot attend with a subset of the heads over a split sequence
        (trainer.sequence_parallel), or None when it can."""
        if cls.caps.head_shards:
            return None
        return cls.refusals.get("head_shards", "its attention is not computed head by head")

    @classmethod
    def attention_flops(cls, model, seq_len: int) -> float:
        """Training FLOPs per token of one layer's kernel (forward + backward = 3 x forward),
        beyond the projections. Softmax: 2 L d for the scores and 2 L d for the values of a
        full L x L product (PaLM's convention), so 12 L d."""
        return 12.0 * model.d_model * seq_len

    def cache_keep(self, k_pos: Tensor, next_pos: int) -> Optional[Tensor]:
        """Which cached keys (positions k_pos) a query at next_pos or later may still see; the
        KV cache drops the others. None: all of them (dense attention)."""
        return None

    # -- paths ----------------------------------------------------------------------------
    def route(self, q_BHLD: Tensor, k_BHSD: Tensor, inp: AttentionInputs) -> str:
        """The path this call takes: the configured backend, or `auto_backend`'s choice."""
        backend = self.cfg.backend
        return self.auto_backend(q_BHLD, k_BHSD, inp) if backend == "auto" else backend

    def auto_backend(self, q_BHLD: Tensor, k_BHSD: Tensor, inp: AttentionInputs) -> str:
        return self.backends[0] if self.backends else "reference"

    def forward(self, q_BHLD: Tensor, k_BHSD: Tensor, v_BHSD: Tensor, inp: AttentionInputs) -> Tensor:
        path = "reference" if _REFERENCE.get() else self.route(q_BHLD, k_BHSD, inp)
        self.path_counts[path] += 1
        if path == "reference":
            return self.reference(q_BHLD, k_BHSD, v_BHSD, inp)
        return self.fast(path, q_BHLD, k_BHSD, v_BHSD, inp)

    def fast(self, path: str, q_BHLD: Tensor, k_BHSD: Tensor, v_BHSD: Tensor, inp: AttentionInputs) -> Tensor:
        """The production path named `path` (one that `route` returns)."""
        raise NotImplementedError

    def reference(self, q_BHLD: Tensor, k_BHSD: Tensor, v_BHSD: Tensor, inp: AttentionInputs) -> Tensor:
        """The plain implementation the fast paths are tested against."""
        raise NotImplementedError
