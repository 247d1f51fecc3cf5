"""Structured sparse attention: one engine for position-based patterns (patterns.py).

`model.attention.pattern` names what each head sees: patterns joined by `+` are a union,
head groups are separated by `|` (heads split evenly), and `layer_patterns` gives one such
spec per layer, cycled (local layers with a global one every 4th:
`[window, window, window, window+globals]`).

    pattern: window                 every head: a sliding window of W keys
    pattern: window+globals         the window and the global tokens
    pattern: strided|fixed          half the heads strided, half fixed

Visible: causal (j <= i), in the query's document (data.document_mask), and the pattern's
rule, or token-id globals (`global_token_ids`, from AttentionInputs.global_mask). Every
query sees some key: each pattern but `globals` guarantees it (block_shift keeps rows
without a target to themselves); a head group whose union does not also sees the key at
the query's own position (a fully masked row is NaN in SDPA and 0 in FlexAttention).

Paths, chosen per call from the inputs:
  * gathered  - CPU (and GPU without FlexAttention) with aligned positions: the sequence in
                blocks of `block`; per query block, only the key blocks the layout marks
                (patterns.py: exact, from interval arithmetic) are gathered, and SDPA runs
                over them with a boolean mask that needs no gradient, so the fused kernel
                runs. Query blocks with the same number of key blocks run in one call. Time
                and memory follow the non-zero blocks; `computed_blocks` counts them.
                Score biases (ALiBi) apply on the gathered blocks from true positions.
  * band      - CPU, one `window` pattern for every head, aligned, no documents, no dropout:
                two causal flash-attention calls per chunk of W queries, merged by their
                log-sum-exps (band.py): no mask, no gather, O(L W) at the fused kernel's speed.
                ALiBi is folded into the dot product (fp32/fp64/bf16).
  * merged    - CPU, every head group's union holds a window of W (window or bigbird; W a
                multiple of the block), aligned, no documents, no token-id globals, no dropout:
                the window on the band and only the blocks beyond it (global, random, ...)
                gathered per head, merged by log-sum-exp in one autograd Function (merged.py).
  * flex      - CUDA, aligned, no dropout, no document ids: FlexAttention with a BlockMask built
                from the rule (`create_block_mask`, block 128) and the positional score_mod,
                compiled.
  * masked    - a KV cache or per-row query positions (ACT): queries in chunks over all
                keys with the rule as the mask (decoding: one query against the cache).
  * reference - the rule evaluated densely on all L x S pairs, in float32.

Shapes: B batch, H heads, L queries, S keys, D head dim, G query blocks in a call, C key
blocks per query block, T block size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lmtrain.model.attention import band
from lmtrain.model.attention.base import ATTENTION, AttentionConfig, AttentionKernel, Capabilities
from lmtrain.model.attention.flex import flex_fn
from lmtrain.model.attention.paths import (
    FOLD_DTYPES,
    and_mask,
    blockwise_sdpa,
    document_mask,
    flex_applies,
    fold_linear_bias,
)
from lmtrain.model.attention.patterns import PATTERNS, Pattern, parse_union


@dataclass
class SparseConfig(AttentionConfig):
    kind: str = "sparse"
    # auto: flex on CUDA (no dropout, aligned positions), else gathered.
    backend: str = "auto"
    pattern: str = "window"  # patterns joined by '+' (a union); head groups separated by '|'
    layer_patterns: list[str] = field(default_factory=list)  # one spec per layer, cycled; empty: `pattern`
    block: int = 64  # T: the block of the gathered path's layout
    window: int = 256  # W: window, dilated and bigbird
    dilation: int = 2  # d: dilated
    stride: int = 128  # l: strided and fixed (about sqrt(L))
    summary: int = 8  # c: fixed's summary columns per stride block
    shifts: list[int] = field(default_factory=lambda: [0, 1])  # block_shift: per head, cycled
    global_first: int = 0  # globals: the first g positions
    global_every: int = 0  # globals: every s-th position (0: none)
    global_token_ids: list[int] = field(default_factory=list)  # globals: these token ids (EOS, newline)
    global_blocks: int = 1  # bigbird: the first g blocks are global
    random_blocks: int = 2  # bigbird: r random earlier blocks per query block and head
    mask_budget_mb: int = 64  # masked path: most bytes one mask chunk may take


DEFAULT_DENSITY_LENGTH = 2048  # where densities are reported before the kernel has run
DENSITY_MAX_LENGTH = 4096  # densities are counted on the dense rule: L^2 pairs at most this long


@dataclass(frozen=True)
class HeadGroup:
    index: int
    patterns: tuple[Pattern, ...]
    token_globals: bool  # honours AttentionInputs.global_mask
    add_self: bool  # no pattern of the union guarantees a key to every query: each keeps its own


def layer_spec(cfg: SparseConfig, layer: int) -> str:
    return cfg.layer_patterns[layer % len(cfg.layer_patterns)] if cfg.layer_patterns else cfg.pattern


def spec_groups(spec: str) -> list[list[str]]:
    """'window|strided+fixed' -> [['window'], ['strided', 'fixed']]."""
    return [parse_union(g) for g in spec.split("|")]


class SparsePlan:
    """The patterns of one layer, per head group: its rule, layout and statistics."""

    def __init__(self, cfg: SparseConfig, *, n_heads: int, layer: int, seed: int):
        groups = spec_groups(layer_spec(cfg, layer))
        self.n_heads = n_heads
        self.block = cfg.block
        self.groups = tuple(
            HeadGroup(g, tuple(PATTERNS[name].build(cfg, n_heads=n_heads, layer=layer, seed=seed) for name in names),
                      bool(cfg.global_token_ids) and "globals" in names,
                      not any(PATTERNS[name].never_empty for name in names))
            for g, names in enumerate(groups))
        self.per_head = len(self.groups) > 1 or any(p.per_head for g in self.groups for p in g.patterns)
        self.token_globals = any(g.token_globals for g in self.groups)
        per_group = n_heads // len(self.groups)
        self._group_of_head = torch.arange(n_heads) // per_group

    def prepare(self, max_pos: int, device) -> None:
        """Before any rule or layout on positions up to max_pos (random tables are drawn here)."""
        for g in self.groups:
            for p in g.patterns:
                p.prepare(max_pos // self.block + 1, self.n_heads, device)

    @property
    def heads(self) -> int:
        """H': 1 when every head shares the pattern, else H."""
        return self.n_heads if self.per_head else 1

    def head_index(self, device) -> Tensor:
        return torch.arange(self.heads, device=device)

    def _combine(self, fn, h: Tensor, tq: Optional[Tensor], tk: Optional[Tensor], same: Tensor) -> Tensor:
        out = None
        gid = self._group_of_head.to(h.device)[h] if len(self.groups) > 1 else None
        for g in self.groups:
            m = None
            for p in g.patterns:
                r = fn(p)
                m = r if m is None else m | r
            if g.token_globals and tq is not None:
                m = m | tq | tk
            if g.add_self:
                m = m | same
            if gid is not None:
                m = m & (gid == g.index)
            out = m if out is None else out | m
        return out

    def visible(self, i: Tensor, j: Tensor, h: Tensor, tq: Optional[Tensor] = None,
                tk: Optional[Tensor] = None) -> Tensor:
        """Key position j visible to query position i in head h (broadcast), with the token-id
        global flags tq (of the query) and tk (of the key) where given."""
        return self._combine(lambda p: p.rule(i, j, h), h, tq, tk, j == i) & (j <= i)

    def layout(self, q_blocks: Tensor, k_blocks: Tensor, p0: int, tq_blocks: Optional[Tensor] = None,
               tk_blocks: Optional[Tensor] = None) -> Tensor:
        """H' x Qb x Kb: key block kb holds a key visible to some query of query block qb.
        Blocks are of `block` positions from p0 (a multiple of the block). tq_blocks/tk_blocks:
        whether a block holds a token-id global (in any row)."""
        T = self.block
        qlo, klo = (p0 + q_blocks * T)[:, None], (p0 + k_blocks * T)[None, :]
        qhi, khi = qlo + T - 1, klo + T - 1
        h = self.head_index(q_blocks.device)[:, None, None]
        causal = klo <= qhi
        tq = tq_blocks[:, None] & causal if tq_blocks is not None else None
        tk = tk_blocks[None, :] & causal if tk_blocks is not None else None
        m = self._combine(lambda p: p.layout(qlo, qhi, klo, khi, h), h, tq, tk,
                          q_blocks[:, None] == k_blocks[None, :]) & causal
        return torch.broadcast_to(m, (self.heads, len(q_blocks), len(k_blocks)))

    def keeps(self, j: Tensor, nxt: int) -> Optional[Tensor]:
        """Keys j < nxt that a future query (position >= nxt) may see in some head: what the KV
        cache keeps. None: any key may be needed again."""
        if self.token_globals:
            return None
        out = None
        for g in self.groups:
            for p in g.patterns:
                k = p.keeps(j, nxt)
                if k is None:
                    return None
                out = k if out is None else out | k
        return out

    def mask(self, L: int) -> Tensor:
        """H' x L x L: key j visible to query i, on positions 0 .. L - 1 (one document, no
        token-id globals): the pattern itself, for densities and pictures."""
        pos = torch.arange(L)
        self.prepare(L - 1, "cpu")
        h = self.head_index("cpu")[:, None, None]
        return torch.broadcast_to(self.visible(pos[:, None], pos[None, :], h), (self.heads, L, L))

    def layout_beyond(self, q_blocks: Tensor, k_blocks: Tensor, p0: int, w: int) -> Tensor:
        """H' x Qb x Kb: key block kb holds a key visible to some query of block qb at distance
        >= w (what the `merged` path gathers beside a window of w; no token-id globals)."""
        T = self.block
        qlo, klo = (p0 + q_blocks * T)[:, None], (p0 + k_blocks * T)[None, :]
        qhi, khi = qlo + T - 1, klo + T - 1
        h = self.head_index(q_blocks.device)[:, None, None]
        out = None
        gid = self._group_of_head.to(h.device)[h] if len(self.groups) > 1 else None
        for g in self.groups:
            m = None
            for p in g.patterns:
                r = p.beyond(qlo, qhi, klo, khi, h, w)
                m = r if m is None else m | r
            if gid is not None:
                m = m & (gid == g.index)
            out = m if out is None else out | m
        return torch.broadcast_to(out & (klo <= qhi), (self.heads, len(q_blocks), len(k_blocks)))

    def density(self, L: int) -> Tensor:
        """Per head (H'): the fraction of the L (L + 1) / 2 causal pairs that are visible."""
        return self.mask(L).sum((-1, -2)).double() / (L * (L + 1) / 2)


@dataclass
class QueryGroup:
    """Query blocks that need the same number C of key blocks: one SDPA call."""

    qsel: Tensor  # G query blocks
    kidx: Tensor  # H' x G x C key blocks (padding: block 0, not valid)
    valid: Tensor  # H' x G x C
    q_pos: Tensor  # G x T positions of the queries
    k_pos: Tensor  # H' x G x CT positions of the gathered keys
    visible: Optional[Tensor] = None  # H' x G x T x CT, kept when it depends on nothing but the layout

    def compute_visible(self, plan: "SparsePlan", tq=None, tk=None) -> Tensor:
        T = self.q_pos.shape[-1]
        key_ok = self.valid[..., None].expand(-1, -1, -1, T).reshape(self.k_pos.shape)
        i, j = self.q_pos[None, :, :, None], self.k_pos[:, :, None, :]
        h = plan.head_index(self.q_pos.device)[:, None, None, None]
        vis = plan.visible(i, j, h, tq, tk) & key_ok[:, :, None, :]
        return vis if vis.dim() == 5 else torch.broadcast_to(vis, (plan.heads, *vis.shape[1:]))


MASK_CACHE_BYTES = 64 << 20  # masks of one layout kept up to this size (beyond: rebuilt per call)


@lru_cache(maxsize=64)
def _gather_plan(plan: "SparsePlan", n_blocks: int, p0: int, device: str):
    """The query groups of one layout and the blocks computed, cached per length."""
    idx = torch.arange(n_blocks, device=device)
    plan.prepare(p0 + n_blocks * plan.block - 1, device)
    return _groups(plan, plan.layout(idx, idx, p0), p0, cache_masks=True)


def _groups(plan: "SparsePlan", layout: Tensor, p0: int, *, cache_masks: bool):
    Hp, QB, KB = layout.shape
    T, dev = plan.block, layout.device
    counts = layout.sum(-1)  # H' x QB
    per_q = counts.amax(0)  # QB
    kb = torch.arange(KB, device=dev)
    # Visible key blocks first, in order: sort by (not visible, index).
    order = torch.where(layout, kb, KB + kb).argsort(dim=-1)
    offs = torch.arange(T, device=dev)
    groups = []
    for c in per_q.unique().tolist():
        qsel = (per_q == c).nonzero().squeeze(1)
        valid = torch.arange(c, device=dev) < counts[:, qsel, None]
        kidx = torch.where(valid, order[:, qsel, :c], 0)  # H' x G x C
        q_pos = p0 + qsel[:, None] * T + offs
        k_pos = (p0 + kidx[..., None] * T + offs).reshape(Hp, len(qsel), c * T)
        groups.append(QueryGroup(qsel, kidx, valid, q_pos, k_pos))
    computed = int(sum(len(g.qsel) * g.kidx.shape[-1] for g in groups))
    if cache_masks and computed * Hp * T * T <= MASK_CACHE_BYTES:
        for g in groups:
            g.visible = g.compute_visible(plan)
    return groups, computed


def _band_blocks(L: int, W: int, T: int) -> int:
    """T x T blocks the band computes for L (a multiple of W, itself a multiple of T): per
    chunk of W, the lower triangle of its causal call and the upper triangle (diagonal
    included) of the call on the previous chunk, which the first chunk has not; that is the
    window's W/T + 1 key blocks per query block (fewer in the first chunk), its exact count."""
    c = W // T
    return (L // W) * c * (c + 1) - c * (c + 1) // 2


@lru_cache(maxsize=64)
def _merged_plan(plan: "SparsePlan", n_blocks: int, p0: int, device: str, window: int):
    """The key blocks beyond a window of `window` (merged path), per group of query blocks with
    the same count, with their masks where some pair is not visible; cached per length."""
    from lmtrain.model.attention.merged import ExtraGroup

    idx = torch.arange(n_blocks, device=device)
    plan.prepare(p0 + n_blocks * plan.block - 1, device)
    layout = plan.layout_beyond(idx, idx, p0, window)
    groups, computed = _groups(plan, layout, p0, cache_masks=False)
    extras = []
    for g in groups:
        if g.kidx.shape[-1] == 0:
            continue
        vis = g.compute_visible(plan) & (g.q_pos[None, :, :, None] - g.k_pos[:, :, None, :] >= window)
        empty = ~vis.any(-1)
        extras.append(ExtraGroup(g.qsel, g.kidx, None if bool(vis.all()) else vis,
                                 empty if bool(empty.any()) else None))
    return extras, computed


def row_flags(flags_BS: Tensor, q_pos: Tensor, k_pos_S: Tensor, p0: int) -> tuple[Tensor, Tensor]:
    """Token-id global flags of the queries (B 1 L 1) and keys (B 1 1 S) from the sequence's
    flags; q_pos may be per row (B x L)."""
    qi = q_pos - p0
    tq = flags_BS.gather(1, qi) if qi.dim() == 2 else flags_BS[:, qi]
    return tq[:, None, :, None], flags_BS[:, k_pos_S - p0][:, None, None, :]


@ATTENTION.register("sparse")
class SparseAttention(AttentionKernel):
    Config = SparseConfig
    caps = Capabilities(score_bias=True, kv_cache=True, query_rows=True, global_tokens=True, document_mask=True,
                        head_shards=True)
    backends = ("gathered", "band", "merged", "flex")
    # window a multiple of the block: the registry-wide tests run the merged path (window|bigbird)
    test_options = {"pattern": "window|bigbird", "window": 8, "block": 4, "random_blocks": 1}

    cfg: SparseConfig

    def __init__(self, cfg: SparseConfig, *, d_model: int, n_heads: int, dropout: float, layer: int = 0):
        super().__init__(cfg, d_model=d_model, n_heads=n_heads, dropout=dropout, layer=layer)
        # The seed of random patterns (bigbird): drawn from torch's generator (run.seed), kept in
        # the state dict, so a checkpoint brings its layout with it.
        seed = int(torch.randint(0, 2**31 - 1, (1,), device="cpu"))
        self.register_buffer("pattern_seed", torch.tensor(seed, dtype=torch.int64))
        self._plan: Optional[tuple[tuple[int, int], SparsePlan]] = None
        self.computed_blocks = 0  # block pairs (T x T) the last gathered call computed, per row and head
        self.stat_length = 0  # the length of the last full-sequence call: densities are reported there
        self._density: dict[tuple[int, int], Tensor] = {}
        if cfg.global_token_ids and any("globals" in g for g in spec_groups(layer_spec(cfg, layer))):
            # The cache keeps no global flags of earlier tokens: generation recomputes.
            self.caps = replace(type(self).caps, kv_cache=False)

    @property
    def plan(self) -> SparsePlan:
        """Rebuilt only when the seed buffer changes (a load_state_dict): its version is compared,
        so no call reads the buffer's value (no host sync on GPU)."""
        stamp = (self.pattern_seed.data_ptr(), self.pattern_seed._version)
        if self._plan is None or self._plan[0] != stamp:
            seed = int(self.pattern_seed)
            self._plan = (stamp, SparsePlan(self.cfg, n_heads=self.n_heads, layer=self.layer, seed=seed))
        return self._plan[1]

    @classmethod
    def check(cls, a) -> list[str]:
        reasons = super().check(a)
        cfg, H = a.model.attention, a.model.n_heads
        if cfg.block < 1:
            reasons.append(f"model.attention.block={cfg.block}: must be at least 1")
        if cfg.mask_budget_mb <= 0:
            reasons.append("model.attention.mask_budget_mb must be positive")
        specs = list(cfg.layer_patterns) or [cfg.pattern]
        used = set()
        for spec in specs:
            key = "model.attention.layer_patterns" if cfg.layer_patterns else "model.attention.pattern"
            groups = spec_groups(spec)
            for names in groups:
                bad = [n for n in names if n not in PATTERNS] or ([] if names else [spec])
                if bad:
                    reasons.append(f"{key}: unknown pattern {bad[0]!r} in {spec!r}; patterns are "
                                   f"{', '.join(PATTERNS)}, joined by '+' (union) and '|' (head groups)")
                used.update(n for n in names if n in PATTERNS)
            if H % len(groups):
                reasons.append(f"{key}: {spec!r} has {len(groups)} head groups, which do not divide "
                               f"model.n_heads={H}")
        if not reasons:
            for name in sorted(used):
                reasons += PATTERNS[name].check(cfg, n_heads=H)
        if cfg.global_token_ids and "globals" not in used:
            reasons.append("model.attention.global_token_ids is set but no pattern uses globals; "
                           "add +globals to a pattern")
        if any(t < 0 for t in cfg.global_token_ids):
            reasons.append("model.attention.global_token_ids: token ids are >= 0")
        return reasons

    @classmethod
    def head_shard_refusal(cls, a) -> Optional[str]:
        """Layouts that are the same for every head attend with any subset of them; per-head
        layouts (head groups, block_shift, bigbird's random blocks) are not split yet."""
        model = a.model
        for layer in range(model.n_layers):
            if SparsePlan(model.attention, n_heads=model.n_heads, layer=layer, seed=0).per_head:
                return (f"layer {layer}'s pattern differs by head (head groups, block_shift or bigbird), and per-head "
                        "layouts are not split across processes yet; use one pattern for all heads")
        return None

    # -- statistics (a HeadStatistics hook, lmtrain/model/hooks.py) ---------------------------
    def head_stats(self) -> dict[str, Tensor]:
        """Per head: the share of the causal query-key pairs the pattern keeps, at the length of
        the last full-sequence call (at most DENSITY_MAX_LENGTH; DEFAULT_DENSITY_LENGTH before any)."""
        L = min(self.stat_length or DEFAULT_DENSITY_LENGTH, DENSITY_MAX_LENGTH)
        key = (L, int(self.pattern_seed))
        if key not in self._density:
            self._density[key] = self.plan.density(L).float().expand(self.n_heads).clone()
        return {"density": self._density[key]}

    def head_stat_limits(self) -> dict[str, float]:
        return {"density": 1.0}

    def cache_keep(self, k_pos: Tensor, next_pos: int) -> Optional[Tensor]:
        """The cached keys still visible to some later query: the last W keys of a window plus the
        global ones, so decoding memory is bounded by the pattern (None where it is not)."""
        return self.plan.keeps(k_pos, next_pos)

    def pattern_mask(self, L: int) -> Tensor:
        """A PatternPicture hook (lmtrain/model/hooks.py): H' x L x L, key j visible to query i."""
        return self.plan.mask(L)

    @classmethod
    def attention_flops(cls, model, seq_len: int) -> float:
        """Softmax's convention (12 d L: both halves of the causal L x L products, PaLM) applied
        to the blocks the layout computes: 12 d x twice the keys a query reads on average, at
        most L, averaged over the layers (token-id globals depend on the data: not counted)."""
        cfg = model.attention
        nb = -(-seq_len // cfg.block)
        idx = torch.arange(nb)
        blocks = 0
        for layer in range(model.n_layers):
            plan = SparsePlan(cfg, n_heads=model.n_heads, layer=layer, seed=0)
            plan.prepare(nb * cfg.block - 1, "cpu")
            blocks += int(plan.layout(idx, idx, 0).sum(-1).amax(0).sum())
        keys_per_query = blocks / model.n_layers * cfg.block / nb  # key blocks per query block, in keys
        return 12.0 * model.d_model * min(seq_len, 2 * keys_per_query)

    # -- routing ---------------------------------------------------------------------------
    def auto_backend(self, q_BHLD, k_BHSD, inp) -> str:
        if flex_applies(q_BHLD, inp, self.attn_dropout):
            return "flex"
        if self._band_applies(q_BHLD, inp):
            return "band"
        return "merged" if self._merged_applies(q_BHLD, inp) else "gathered"

    def _band_ready(self, q_BHLD, inp) -> bool:
        """What the band needs: aligned positions, no documents, no dropout, CPU, and no score
        bias or a linear one folded (fp32/fp64/bf16)."""
        bias_ok = not inp.position.has_score_bias or (
            inp.position.linear_bias_slopes() is not None and q_BHLD.dtype in FOLD_DTYPES)
        return (bias_ok and not q_BHLD.is_cuda and inp.aligned and inp.doc_ids is None and self.attn_dropout == 0.0
                and band.available())

    def _band_applies(self, q_BHLD, inp) -> bool:
        """One sliding window for every head, and what the band needs."""
        plan = self.plan
        window_only = len(plan.groups) == 1 and [p.name for p in plan.groups[0].patterns] == ["window"]
        return window_only and min(self.cfg.window, q_BHLD.shape[2]) >= 2 and self._band_ready(q_BHLD, inp)

    def _merged_applies(self, q_BHLD, inp) -> bool:
        """Every head group holds a window of W (window or bigbird), W is a multiple of the block,
        the sequence is longer than W, no token-id globals, and what the band needs."""
        plan, W = self.plan, self.cfg.window
        windowed = all(any(p.name in ("window", "bigbird") for p in g.patterns) for g in plan.groups)
        return (windowed and not plan.token_globals and W >= 2 and W % self.cfg.block == 0
                and q_BHLD.shape[2] > W and int(inp.k_pos[0]) % self.cfg.block == 0
                and self._band_ready(q_BHLD, inp))

    def route(self, q_BHLD, k_BHSD, inp) -> str:
        if inp.aligned:
            self.stat_length = q_BHLD.shape[2]
        path = super().route(q_BHLD, k_BHSD, inp)
        if path == "band" and not self._band_applies(q_BHLD, inp):
            path = "gathered"
        if path == "merged" and not self._merged_applies(q_BHLD, inp):
            path = "gathered"
        if path in ("gathered", "flex") and not self._aligned(inp):
            path = "masked"
        if path == "flex" and inp.doc_ids is not None:
            path = "gathered"  # the block mask is built from the pattern alone
        return path

    def _aligned(self, inp) -> bool:
        return inp.aligned and int(inp.k_pos[0]) % self.cfg.block == 0

    def _token_flags(self, inp) -> Optional[Tensor]:
        if not self.plan.token_globals:
            return None
        if inp.global_mask is None:
            raise ValueError("model.attention.global_token_ids: this call has no global-token mask "
                             "(AttentionInputs.global_mask); the decoder builds it from the token ids")
        return inp.global_mask

    def fast(self, path, q_BHLD, k_BHSD, v_BHSD, inp):
        if path == "band":
            return self._band(q_BHLD, k_BHSD, v_BHSD, inp)
        if path == "merged":
            return self._merged(q_BHLD, k_BHSD, v_BHSD, inp)
        if path == "flex":
            return self._flex(q_BHLD, k_BHSD, v_BHSD, inp)
        if path == "gathered":
            return self._gathered(q_BHLD, k_BHSD, v_BHSD, inp)
        return self._masked(q_BHLD, k_BHSD, v_BHSD, inp)

    # -- paths -------------------------------------------------------------------------------
    def _gathered(self, q_BHLD, k_BHSD, v_BHSD, inp):
        B, H, L, D = q_BHLD.shape
        T, plan = self.cfg.block, self.plan
        p0 = int(inp.k_pos[0])
        nb = -(-L // T)
        pad = nb * T - L
        flags = self._token_flags(inp)
        # Blocks along dim 1, heads inside (B nb T H D): a gathered block is one contiguous row, and
        # query blocks become batch entries of a 4-D SDPA call (which its fused CPU kernel needs).
        q_, k_, v_ = (F.pad(t.transpose(1, 2), (0, 0, 0, 0, 0, pad)).reshape(B, nb, T, H, D)
                      for t in (q_BHLD, k_BHSD, v_BHSD))
        if flags is not None and pad:
            flags = F.pad(flags, (0, pad))
        docs = inp.doc_ids
        if docs is not None and pad:
            docs = F.pad(docs, (0, pad), value=-1)  # padded queries and keys: a document of their own
        dev = q_BHLD.device
        if flags is None:
            groups, computed = _gather_plan(plan, nb, p0, str(dev))
        else:
            plan.prepare(p0 + nb * T - 1, dev)
            idx = torch.arange(nb, device=dev)
            any_flag = flags.view(B, nb, T).any(-1).any(0)
            groups, computed = _groups(plan, plan.layout(idx, idx, p0, any_flag, any_flag), p0, cache_masks=False)
        self.computed_blocks = computed  # per batch row and head
        if plan.heads > 1:  # per-head key blocks: heads outside the blocks, B (H nb) T D
            k_h, v_h = (t.permute(0, 3, 1, 2, 4).reshape(B, H * nb, T, D) for t in (k_, v_))
            head_base = (torch.arange(H, device=dev) * nb)[:, None, None]
        # One gather each for q, k and v over every group (split per group after): one gradient
        # buffer each in backward, not one per group.
        sizes = [len(g.qsel) for g in groups]
        q_parts = q_.index_select(1, torch.cat([g.qsel for g in groups])).split(sizes, dim=1)  # B G T H D
        if plan.heads == 1:
            flat = torch.cat([g.kidx[0].flatten() for g in groups])
            k_parts, v_parts = (t.index_select(1, flat).split([n * g.kidx.shape[-1] for n, g in zip(sizes, groups)], 1)
                                for t in (k_, v_))  # B (G C) T H D
        else:
            flat = torch.cat([(head_base + g.kidx).transpose(0, 1).flatten() for g in groups])  # G H C
            k_parts, v_parts = (t.index_select(1, flat).split([n * H * g.kidx.shape[-1] for n, g in zip(sizes, groups)],
                                                              1) for t in (k_h, v_h))  # B (G H C) T D
        outs = []
        for g, qp, kp, vp in zip(groups, q_parts, k_parts, v_parts):  # kidx, valid: H' x G x C
            G, C = g.qsel.shape[0], g.kidx.shape[-1]
            qg = qp.transpose(2, 3).reshape(B * G, H, T, D)
            if plan.heads == 1:
                kg, vg = (t.view(B, G, C * T, H, D).transpose(2, 3).reshape(B * G, H, C * T, D) for t in (kp, vp))
            else:
                kg, vg = (t.reshape(B * G, H, C * T, D) for t in (kp, vp))
            vis = g.visible
            if vis is None:
                tq = tk = None
                if flags is not None:
                    f3 = flags.view(B, nb, T)
                    tq = f3[:, g.qsel][:, None, :, :, None]  # B 1 G T 1
                    tk = f3[:, g.kidx].reshape(B, plan.heads, G, 1, C * T)  # B H' G 1 CT
                vis = g.compute_visible(plan, tq, tk)  # [B] H' G T CT
            if docs is not None:
                dq = docs[:, g.q_pos - p0][:, None, :, :, None]  # B 1 G T 1
                dk = docs[:, g.k_pos - p0][:, :, :, None, :]  # B H' G 1 CT
                vis = vis & (dq == dk)
            mask = self._gathered_bias(vis, inp, g.q_pos, g.k_pos, q_BHLD.dtype) if inp.position.has_score_bias \
                else vis
            # [B] H' G T CT -> (B G) H' T CT
            mask = mask.movedim(-3, 0) if mask.dim() == 4 else mask.movedim(-3, 1)
            if mask.dim() == 4 and B > 1:
                mask = mask.expand(B, *mask.shape).reshape(B * G, *mask.shape[1:])
            elif mask.dim() == 5:
                mask = mask.reshape(B * G, *mask.shape[2:])
            o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, dropout_p=self.attn_dropout)
            outs.append(o.view(B, G, H, T, D))
        out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        if len(outs) > 1:
            out = out.index_select(1, torch.cat([g.qsel for g in groups]).argsort())
        out = out.permute(0, 2, 1, 3, 4).reshape(B, H, nb * T, D)
        return out[:, :, :L] if pad else out

    def _band(self, q_BHLD, k_BHSD, v_BHSD, inp):
        D = q_BHLD.shape[-1]
        if inp.position.has_score_bias:
            q_BHLD, k_BHSD, v_BHSD = fold_linear_bias(q_BHLD, k_BHSD, v_BHSD, inp.position.linear_bias_slopes(),
                                                      inp.q_pos)
        out = band.sliding_window_attention(q_BHLD, k_BHSD, v_BHSD, self.cfg.window, 1 / math.sqrt(D))
        W, T, L = min(self.cfg.window, q_BHLD.shape[2]), self.cfg.block, q_BHLD.shape[2]
        if W % T == 0:  # counted in blocks of T where the chunks are made of them
            self.computed_blocks = _band_blocks(L + (-L % W), W, T)
        return out[..., :D]

    def _merged(self, q_BHLD, k_BHSD, v_BHSD, inp):
        """The window on the band and the blocks beyond it gathered, merged by log-sum-exp (merged.py)."""
        from lmtrain.model.attention.merged import window_and_extras

        B, H, L, D = q_BHLD.shape
        W, T = self.cfg.window, self.cfg.block
        if inp.position.has_score_bias:
            q_BHLD, k_BHSD, v_BHSD = fold_linear_bias(q_BHLD, k_BHSD, v_BHSD, inp.position.linear_bias_slopes(),
                                                      inp.q_pos)
        pad = -L % W
        if pad:  # padded keys come after every real query
            q_BHLD, k_BHSD, v_BHSD = (F.pad(t, (0, 0, 0, pad)) for t in (q_BHLD, k_BHSD, v_BHSD))
        n_blocks = (L + pad) // T
        extras, beyond = _merged_plan(self.plan, n_blocks, int(inp.k_pos[0]), str(q_BHLD.device), W)
        self.computed_blocks = beyond + _band_blocks(L + pad, W, T)
        out = window_and_extras(q_BHLD, k_BHSD, v_BHSD, W, T, 1 / math.sqrt(D), extras)
        return out[:, :, :L, :D]

    def _gathered_bias(self, vis, inp, q_pos_GT, k_pos_HGK, dtype):
        """The score bias on gathered blocks from their true positions, -inf where not visible:
        H x G x T x CT (the scheme's bias takes query rows G x T, keys per row)."""
        bias = inp.position.score_bias(q_pos_GT, k_pos_HGK[:, :, None, :])  # H' G H T CT
        if bias.shape[0] == 1:
            bias = bias[0].transpose(0, 1)
        else:
            bias = torch.diagonal(bias, dim1=0, dim2=2).permute(3, 0, 1, 2)
        return bias.to(dtype).masked_fill(~vis, float("-inf"))

    def _masked(self, q_BHLD, k_BHSD, v_BHSD, inp):
        plan, S = self.plan, k_BHSD.shape[2]
        flags = self._token_flags(inp)
        h = plan.head_index(q_BHLD.device)
        plan.prepare(int(max(inp.q_pos.max(), inp.k_pos.max())), q_BHLD.device)
        if inp.position.has_score_bias:
            bytes_per_row = (q_BHLD.shape[0] if inp.per_row else 1) * self.n_heads * S * q_BHLD.element_size()
        else:
            bytes_per_row = (q_BHLD.shape[0] if inp.per_row else 1) * plan.heads * S
        chunk = max(1, (self.cfg.mask_budget_mb << 20) // bytes_per_row)

        def mask(qp, kp):  # qp: l or B x l; kp: S
            i = qp[..., None, :, None]  # [B] 1 l 1
            j = kp[None, None, :]
            tq = tk = None
            if flags is not None:  # no cache with token globals: positions index the sequence
                tq, tk = row_flags(flags, qp, kp, int(inp.k_pos[0]))
            vis = and_mask(plan.visible(i, j, h[:, None, None], tq, tk), document_mask(inp, qp, kp))
            if inp.position.has_score_bias:
                bias = inp.position.score_bias(qp, kp).to(q_BHLD.dtype)
                return bias.masked_fill(~vis, float("-inf"))
            return vis

        return blockwise_sdpa(q_BHLD, k_BHSD, v_BHSD, inp.q_pos, inp.k_pos, block=chunk, mask=mask,
                              dropout=self.attn_dropout)

    def _flex(self, q_BHLD, k_BHSD, v_BHSD, inp):
        from torch.nn.attention.flex_attention import create_block_mask

        plan, L = self.plan, q_BHLD.shape[2]
        p0 = int(inp.k_pos[0])
        flags = self._token_flags(inp)
        plan.prepare(p0 + L - 1, q_BHLD.device)

        def mask_mod(b, h, q_idx, kv_idx):
            i, j = q_idx + p0, kv_idx + p0
            hp = h if plan.heads > 1 else h * 0
            tq = flags[b, q_idx] if flags is not None else None
            tk = flags[b, kv_idx] if flags is not None else None
            return plan.visible(i, j, hp, tq, tk)

        block_mask = create_block_mask(mask_mod, q_BHLD.shape[0] if flags is not None else None,
                                       self.n_heads if plan.heads > 1 else None, L, L, device=str(q_BHLD.device))
        fn = flex_fn(q_BHLD.is_cuda)
        return fn(q_BHLD, k_BHSD, v_BHSD, score_mod=inp.position.score_mod(), block_mask=block_mask)

    def reference(self, q_BHLD, k_BHSD, v_BHSD, inp):
        """The rule on all L x S pairs; softmax in float32 at least."""
        dtype = q_BHLD.dtype
        q, k, v = (t.to(torch.promote_types(t.dtype, torch.float32)) for t in (q_BHLD, k_BHSD, v_BHSD))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if inp.position.has_score_bias:
            scores = scores + inp.position.score_bias(inp.q_pos, inp.k_pos).to(scores.dtype)
        plan = self.plan
        h = plan.head_index(q.device)
        plan.prepare(int(max(inp.q_pos.max(), inp.k_pos.max())), q.device)
        flags = self._token_flags(inp)
        tq = tk = None
        if flags is not None:
            tq, tk = row_flags(flags, inp.q_pos, inp.k_pos, int(inp.k_pos[0]))
        vis = plan.visible(inp.q_pos[..., None, :, None], inp.k_pos[None, None, :], h[:, None, None], tq, tk)
        vis = and_mask(vis, document_mask(inp, inp.q_pos, inp.k_pos))
        probs = scores.masked_fill(~vis, float("-inf")).softmax(-1)
        probs = F.dropout(probs, p=self.attn_dropout, training=self.attn_dropout > 0)
        return (probs @ v).to(dtype)
