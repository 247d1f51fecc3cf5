"""Position-based sparsity patterns for `model.attention.kind: sparse` (lmtrain/model/attention/sparse.py).

A pattern is two functions over absolute positions, i of a query and j of a key:

  * `rule(i, j, h)`  - key j is visible to query i in head h. Element-wise on broadcastable
                       integer tensors, so the same code builds a dense mask, the mask of a
                       block of gathered keys, and a FlexAttention `mask_mod`. Causality
                       (j <= i) and "every row keeps itself" are added by the engine.
  * `layout(qlo, qhi, klo, khi, h)` - for a grid of query blocks [qlo, qhi] and key blocks
                       [klo, khi]: whether some i in the query block and j <= i in the key
                       block is visible. Exact, from interval arithmetic (never from a dense
                       evaluation, so building it costs blocks^2, not L^2); a test checks it
                       against the block-wise OR of `rule` for every pattern.

Patterns (Child et al. 2019; Qiu et al. 2019; Beltagy et al. 2020; Zaheer et al. 2020):

  window     i - j < W
  dilated    (i - j) % d == 0 and (i - j) / d < W
  strided    i - j < l or (i - j) % l == 0          (Sparse Transformer, both parts as a union)
  fixed      j // l == i // l or j % l >= l - c      (Sparse Transformer, c summary columns)
  block_shift  block(j) == block(i) - s_h per head (s = 0: block-diagonal); rows without a
               target keep only themselves
  globals    i in G or j in G: G = the first g positions and every s-th position (token ids,
             which change per batch, are handled by the engine from AttentionInputs.global_mask)
  bigbird    window, the first g blocks (read by all, reading their prefix), and r random
             earlier blocks per query block and head, drawn from a hash of (seed, layer, head,
             query block, key block): the same for any length, on every rank, in training,
             evaluation, decoding and a reversible recompute. The seed is a buffer of the
             kernel (in the state dict).

Shapes: positions are int64 tensors; h broadcasts against them (heads first).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import Tensor

PATTERNS: dict[str, type["Pattern"]] = {}


def register(name: str) -> Callable[[type["Pattern"]], type["Pattern"]]:
    def deco(cls):
        cls.name = name
        PATTERNS[name] = cls
        return cls

    return deco


def _ceil_div(a: Tensor | int, b: int):
    return -(-a // b)


def has_multiple(a: Tensor, b: Tensor, m: int) -> Tensor:
    """Some x in [a, b] (a >= 0) is a multiple of m."""
    return _ceil_div(a, m) * m <= b


def has_residue_at_least(a: Tensor, b: Tensor, m: int, r0: int) -> Tensor:
    """Some x in [a, b] (a >= 0) has x % m >= r0."""
    ra = a % m
    first = torch.where(ra >= r0, a, a + (r0 - ra))
    return (first <= b) & (a <= b)


def distance_range(qlo: Tensor, qhi: Tensor, klo: Tensor, khi: Tensor) -> tuple[Tensor, Tensor]:
    """The causal distances i - j >= 0 a block pair holds: [a, b] (empty where b < 0)."""
    return (qlo - khi).clamp(min=0), qhi - klo


@dataclass(frozen=True)
class Pattern:
    """One pattern with its options; `cfg` is the sparse kind's config node."""

    name: ClassVar[str] = ""
    per_head: ClassVar[bool] = False  # the rule reads h
    never_empty: ClassVar[bool] = True  # every query sees some key (else the engine adds the query's own)

    def prepare(self, n_blocks: int, n_heads: int, device) -> None:
        """Called before `rule` or `layout` with the number of blocks the positions reach."""

    def rule(self, i: Tensor, j: Tensor, h: Tensor) -> Tensor:
        raise NotImplementedError

    def layout(self, qlo: Tensor, qhi: Tensor, klo: Tensor, khi: Tensor, h: Tensor) -> Tensor:
        raise NotImplementedError

    def beyond(self, qlo: Tensor, qhi: Tensor, klo: Tensor, khi: Tensor, h: Tensor, w: int) -> Tensor:
        """Like `layout`, for the pairs at distance >= w only (what a window of w leaves to other
        key blocks): exact or a superset (the engine masks pair by pair)."""
        return self.layout(qlo, qhi, klo, khi, h) & (qhi - klo >= w)

    def keeps(self, j: Tensor, nxt: int) -> Tensor | None:
        """Whether some future query (position >= nxt) may see key j < nxt, in any head: what
        a KV cache must keep. None: any key may be needed again (the cache keeps everything)."""
        return None

    @classmethod
    def build(cls, cfg, *, n_heads: int, layer: int, seed: int) -> "Pattern":
        raise NotImplementedError

    @classmethod
    def check(cls, cfg, *, n_heads: int) -> list[str]:
        """Reasons its options are unusable (one line each, naming the key)."""
        return []


def _positive(cfg, *names) -> list[str]:
    return [f"model.attention.{n}={getattr(cfg, n)}: must be at least 1" for n in names if getattr(cfg, n) < 1]


@register("window")
@dataclass(frozen=True)
class Window(Pattern):
    w: int

    def rule(self, i, j, h):
        return i - j < self.w

    def layout(self, qlo, qhi, klo, khi, h):
        a, b = distance_range(qlo, qhi, klo, khi)
        return (b >= 0) & (a < self.w)

    def beyond(self, qlo, qhi, klo, khi, h, w):
        a, b = distance_range(qlo, qhi, klo, khi)
        return (b >= 0) & (a < self.w) & (b >= w) & (self.w > w)

    def keeps(self, j, nxt):
        return nxt - j < self.w

    @classmethod
    def build(cls, cfg, **kw):
        return cls(cfg.window)

    @classmethod
    def check(cls, cfg, **kw):
        return _positive(cfg, "window")


@register("dilated")
@dataclass(frozen=True)
class Dilated(Pattern):
    w: int
    d: int

    def rule(self, i, j, h):
        x = i - j
        return (x % self.d == 0) & (x < self.w * self.d)

    def layout(self, qlo, qhi, klo, khi, h):
        a, b = distance_range(qlo, qhi, klo, khi)
        return (b >= 0) & has_multiple(a, b.clamp(max=(self.w - 1) * self.d), self.d)

    def keeps(self, j, nxt):
        return nxt - j <= (self.w - 1) * self.d

    @classmethod
    def build(cls, cfg, **kw):
        return cls(cfg.window, cfg.dilation)

    @classmethod
    def check(cls, cfg, **kw):
        return _positive(cfg, "window", "dilation")


@register("strided")
@dataclass(frozen=True)
class Strided(Pattern):
    stride: int

    def rule(self, i, j, h):
        x = i - j
        return (x < self.stride) | (x % self.stride == 0)

    def layout(self, qlo, qhi, klo, khi, h):
        a, b = distance_range(qlo, qhi, klo, khi)
        return (b >= 0) & ((a < self.stride) | has_multiple(a, b, self.stride))

    @classmethod
    def build(cls, cfg, **kw):
        return cls(cfg.stride)

    @classmethod
    def check(cls, cfg, **kw):
        return _positive(cfg, "stride")


@register("fixed")
@dataclass(frozen=True)
class Fixed(Pattern):
    stride: int
    summary: int
    block: int  # the engine's block: how many stride blocks one block pair can touch

    def rule(self, i, j, h):
        return (j // self.stride == i // self.stride) | (j % self.stride >= self.stride - self.summary)

    def layout(self, qlo, qhi, klo, khi, h):
        l = self.stride  # noqa: E741  (the paper's name)
        # Summary columns: some j in [klo, min(khi, qhi)] with j % l >= l - c.
        out = has_residue_at_least(klo, torch.minimum(khi, qhi), l, l - self.summary)
        # Same stride block t with some j <= i: t runs over the stride blocks the key block touches.
        for u in range(self.block // l + 2):
            t = klo // l + u
            jmin = torch.maximum(klo, t * l)
            imin, imax = torch.maximum(qlo, t * l), torch.minimum(qhi, t * l + l - 1)
            out = out | ((t * l <= khi) & (imin <= imax) & (jmin <= imax))
        return out

    def keeps(self, j, nxt):
        return (j // self.stride == nxt // self.stride) | (j % self.stride >= self.stride - self.summary)

    @classmethod
    def build(cls, cfg, **kw):
        return cls(cfg.stride, cfg.summary, cfg.block)

    @classmethod
    def check(cls, cfg, **kw):
        reasons = _positive(cfg, "stride", "summary")
        if not reasons and cfg.summary > cfg.stride:
            reasons.append(f"model.attention.summary={cfg.summary}: at most model.attention.stride={cfg.stride}")
        return reasons


@register("block_shift")
@dataclass(frozen=True)
class BlockShift(Pattern):
    block: int
    shifts: tuple[int, ...]  # one per head
    per_head: ClassVar[bool] = True

    def _shift(self, h: Tensor) -> Tensor:
        return torch.tensor(self.shifts, device=h.device)[h]

    def rule(self, i, j, h):
        bi, bj, s = i // self.block, j // self.block, self._shift(h)
        return (bj == bi - s) | ((bi - s < 0) & (i == j))

    def layout(self, qlo, qhi, klo, khi, h):
        qb, kb, s = qlo // self.block, klo // self.block, self._shift(h)
        return (kb == qb - s) | ((qb - s < 0) & (kb == qb))

    def keeps(self, j, nxt):
        return j // self.block >= nxt // self.block - max(self.shifts)

    @classmethod
    def build(cls, cfg, *, n_heads, **kw):
        shifts = tuple(cfg.shifts[h % len(cfg.shifts)] for h in range(n_heads))
        return cls(cfg.block, shifts)

    @classmethod
    def check(cls, cfg, **kw):
        if not cfg.shifts:
            return ["model.attention.shifts is empty: give one block shift per head (cycled), e.g. [0, 1]"]
        return [f"model.attention.shifts: {s} is negative; shifts are causal (>= 0)" for s in cfg.shifts if s < 0]


@register("globals")
@dataclass(frozen=True)
class Globals(Pattern):
    first: int  # positions 0..first-1
    every: int  # every `every`-th position (0: none)
    never_empty: ClassVar[bool] = False  # token-id globals alone leave the rows before the first one empty

    def _is_global(self, p: Tensor) -> Tensor:
        g = p < self.first
        return g | (p % self.every == 0) if self.every else g

    def rule(self, i, j, h):
        return self._is_global(i) | self._is_global(j)

    def _any(self, lo: Tensor, hi: Tensor) -> Tensor:
        """Some position in [lo, hi] is global."""
        g = (lo < self.first) & (lo <= hi)
        return g | has_multiple(lo, hi, self.every) if self.every else g

    def layout(self, qlo, qhi, klo, khi, h):
        keys = self._any(klo, torch.minimum(khi, qhi))  # a global key at or before some query
        queries = self._any(torch.maximum(qlo, klo), qhi)  # a global query with some key before it
        return keys | queries

    def keeps(self, j, nxt):
        if self.every or nxt < self.first:  # a future query is global: it reads every earlier key
            return None
        return j < self.first

    @classmethod
    def build(cls, cfg, **kw):
        return cls(cfg.global_first, cfg.global_every)

    @classmethod
    def check(cls, cfg, **kw):
        reasons = [f"model.attention.{n}={getattr(cfg, n)}: must be 0 (none) or positive"
                   for n in ("global_first", "global_every") if getattr(cfg, n) < 0]
        if not reasons and not (cfg.global_first or cfg.global_every or cfg.global_token_ids):
            reasons.append("pattern globals has no global tokens: set model.attention.global_first, "
                           "global_every or global_token_ids")
        return reasons


def mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (the finaliser of a well-known mixer), in int64 without overflow."""
    m = 0xFFFFFFFF
    x = x & m
    x = (((x >> 16) ^ x) * 0x45D9F3B) & m
    x = (((x >> 16) ^ x) * 0x45D9F3B) & m
    return (x >> 16) ^ x


@register("bigbird")
@dataclass(frozen=True)
class BigBird(Pattern):
    w: int
    block: int
    global_blocks: int
    random_blocks: int
    seed: int  # the kernel's buffer, mixed with the layer
    tables: dict = field(default_factory=dict, compare=False, repr=False)  # device -> H x n x n
    per_head: ClassVar[bool] = True

    def random_table(self, n_blocks: int, n_heads_h: Tensor) -> Tensor:
        """h x n x n: key block kb is one of the r random blocks of query block qb in head h.
        Candidates are the blocks before the window and after the global ones; the r with the
        smallest hash win, so the draw of a block never depends on the length."""
        dev = n_heads_h.device
        qb = torch.arange(n_blocks, device=dev)[:, None]
        kb = torch.arange(n_blocks, device=dev)[None, :]
        h = n_heads_h.reshape(-1, 1, 1)
        wb = _ceil_div(self.w, self.block)
        candidate = (kb >= self.global_blocks) & (kb < qb - wb)
        key = mix32(mix32(mix32(mix32(torch.full_like(h, self.seed) + h) + qb) + kb) + 0x9E3779B9)
        big = torch.iinfo(torch.int64).max
        key = torch.where(candidate, key, big)
        r = min(self.random_blocks, n_blocks)
        chosen = torch.zeros(key.shape, dtype=torch.bool, device=dev)
        if r:
            vals, idx = key.topk(r, dim=-1, largest=False)
            chosen.scatter_(-1, idx, vals < big)
        return chosen

    def prepare(self, n_blocks: int, n_heads: int, device) -> None:
        """Draw the random blocks of the first n_blocks blocks (a cache: longer draws extend it)."""
        table = self.tables.get(str(device))
        if table is None or table.shape[-1] < n_blocks:
            self.tables[str(device)] = self.random_table(n_blocks, torch.arange(n_heads, device=device))

    def _random(self, qb: Tensor, kb: Tensor, h: Tensor) -> Tensor:
        table = self.tables.get(str(qb.device))
        if table is None:
            raise RuntimeError("bigbird: prepare(n_blocks, ...) must run before the rule")
        return table[h, qb, kb]

    def rule(self, i, j, h):
        qb, kb = i // self.block, j // self.block
        fixed = (i - j < self.w) | (kb < self.global_blocks) | (qb < self.global_blocks)
        return fixed | self._random(qb, kb, h)

    def layout(self, qlo, qhi, klo, khi, h):
        a, b = distance_range(qlo, qhi, klo, khi)
        qb, kb = qlo // self.block, klo // self.block
        fixed = (b >= 0) & ((a < self.w) | (kb < self.global_blocks) | (qb < self.global_blocks))
        return fixed | self._random(qb, kb, h)

    def beyond(self, qlo, qhi, klo, khi, h, w):
        a, b = distance_range(qlo, qhi, klo, khi)
        qb, kb = qlo // self.block, klo // self.block
        far = (b >= w) & (b >= 0)
        own = far & (a < self.w) & (self.w > w)  # its own window, where wider than w
        return own | far & ((kb < self.global_blocks) | (qb < self.global_blocks)) | self._random(qb, kb, h)

    def keeps(self, j, nxt):
        if self.random_blocks or nxt // self.block < self.global_blocks:  # random blocks: any earlier block
            return None
        return (nxt - j < self.w) | (j // self.block < self.global_blocks)

    @classmethod
    def build(cls, cfg, *, layer, seed, **kw):
        mixed = int(mix32(torch.tensor(int(seed)) + layer * 0x632BE5AB))
        return cls(cfg.window, cfg.block, cfg.global_blocks, cfg.random_blocks, mixed)

    @classmethod
    def check(cls, cfg, **kw):
        reasons = _positive(cfg, "window")
        reasons += [f"model.attention.{n}={getattr(cfg, n)}: must be 0 or positive"
                    for n in ("global_blocks", "random_blocks") if getattr(cfg, n) < 0]
        return reasons


def parse_union(spec: str) -> list[str]:
    """'window+globals' -> ['window', 'globals']."""
    return [p.strip() for p in spec.split("+") if p.strip()]


def unknown_patterns(spec: str) -> list[str]:
    return [p for p in parse_union(spec) if p not in PATTERNS] or ([] if parse_union(spec) else [spec])
