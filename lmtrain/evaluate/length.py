"""Length-extrapolation evaluation: loss and perplexity of a model at several window lengths.

The scored tokens are fixed before any length is looked at: the targets at stream indices
[C, C + N), where C is the longest evaluated length. So every length (and every model on
the same tokens) is scored on exactly the same N tokens, and every scored token can be
given its full context at every length.

A window is (a, L, p0): inputs tokens[a : a + L], targets tokens[a + 1 : a + L + 1]; the
targets at window positions p0 .. L-1 are scored. Target index j sits at position
j - a - 1.

  nonoverlap   consecutive windows of L; every position of a window is scored.
  sliding S    the window moves by S and scores only its last S positions, so each scored
               token sees at least L - S tokens of context (Press et al. 2022).

Both modes end with a window that finishes on the last scored target and scores only the
tokens not scored before, so sliding with S = L is exactly nonoverlap.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lmtrain.train.loss import perplexity

MODES = ("nonoverlap", "sliding")


class EvalError(ValueError):
    """Bad evaluation settings; the message names the option."""


@dataclass(frozen=True)
class Window:
    start: int  # index of the first input token
    length: int
    first_scored: int  # window position of the first scored target


@dataclass(frozen=True)
class Plan:
    """The windows for one length. `offset` = C, `n_scored` = N (see the module docstring)."""

    mode: str
    length: int
    stride: int
    offset: int
    n_scored: int

    def __post_init__(self):
        if self.offset < self.length:
            raise EvalError(f"the first scored token ({self.offset}) must have {self.length} tokens before it")

    def windows(self) -> Iterator[Window]:
        L, S = self.length, (self.length if self.mode == "nonoverlap" else self.stride)
        done = 0
        while done < self.n_scored:
            s = min(S, self.n_scored - done)
            last_target = self.offset + done + s - 1
            yield Window(start=last_target - L, length=L, first_scored=L - s)
            done += s

    def n_windows(self) -> int:
        S = self.length if self.mode == "nonoverlap" else self.stride
        return math.ceil(self.n_scored / S)

    def tokens_processed(self) -> int:
        return self.n_windows() * self.length


def resolve_stride(mode: str, length: int, stride: Optional[int]) -> int:
    """Stride in tokens for one length; None means half the length in sliding mode."""
    if mode == "nonoverlap":
        return length
    s = max(1, length // 2) if stride is None else stride
    if not 1 <= s <= length:
        raise EvalError(f"--stride {s}: must be between 1 and the length {length} "
                        "(each window scores its last S tokens)")
    return s


def scored_range(n_tokens: int, lengths: Sequence[int], max_tokens: Optional[int]) -> tuple[int, int]:
    """(offset C, count N) of the scored targets for a stream of n_tokens tokens."""
    if not lengths or min(lengths) < 1:
        raise EvalError("--lengths: give one or more positive lengths, e.g. 128,256,512")
    offset = max(lengths)
    available = n_tokens - offset
    if available < 1:
        raise EvalError(f"--lengths: the longest length {offset} needs more than {offset} tokens of text; "
                        f"this text has {n_tokens}")
    n = available if max_tokens is None else min(available, max_tokens)
    if n < 1:
        raise EvalError("--max-tokens: must be at least 1")
    # A multiple of the longest length when there is room, so that no length needs a short last window.
    if n >= offset:
        n -= n % offset
    return offset, n


def make_plans(n_tokens: int, lengths: Sequence[int], mode: str, stride: Optional[int],
               max_tokens: Optional[int]) -> dict[int, Plan]:
    """One plan per length, all over the same scored targets of an n_tokens stream."""
    if mode not in MODES:
        raise EvalError(f"--mode {mode}: choose one of {', '.join(MODES)}")
    lengths = sorted(set(lengths))
    strides = {L: resolve_stride(mode, L, stride) for L in lengths}
    offset, n = scored_range(n_tokens, lengths, max_tokens)
    return {L: Plan(mode, L, strides[L], offset, n) for L in lengths}


@dataclass
class LengthResult:
    length: int
    status: str = "ok"  # ok | unsupported
    reason: str = ""
    loss: float = float("nan")
    ppl: float = float("nan")
    tokens_scored: int = 0
    tokens_processed: int = 0
    windows: int = 0
    seconds: float = 0.0
    # Buckets of window positions [edges[i], edges[i+1]): mean loss (None if empty) and count.
    bucket_edges: list = field(default_factory=list)
    bucket_loss: list = field(default_factory=list)
    bucket_tokens: list = field(default_factory=list)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        for k in ("loss", "ppl"):
            if not math.isfinite(d[k]):
                d[k] = None
        return d


def bucket_edges(length: int, per_octave: int = 4) -> list[int]:
    """Edges of position buckets, evenly spaced on a log scale: [0, 1), [1, 2), ... with
    `per_octave` buckets per doubling (fewer at the start, where they would be empty)."""
    if per_octave < 1:
        raise EvalError("--buckets-per-octave: must be at least 1")
    edges = {0, length}
    k = 0
    while (e := int(2 ** (k / per_octave))) < length:
        edges.add(e)
        k += 1
    return sorted(edges)


def unsupported_reason(model, length: int) -> Optional[str]:
    limit = model.max_len
    if limit is not None and length > limit:
        return f"{model.cfg.position.kind} positions end at {limit}"
    return None


@torch.no_grad()
def window_losses(model, inputs_BL: torch.Tensor, targets_BL: torch.Tensor, first_scored: int,
                  head_chunk: int = 2048) -> torch.Tensor:
    """Per-token losses (float32, B x (L - first_scored)) of the scored positions. The LM head
    runs on the scored positions only, `head_chunk` rows at a time."""
    hidden_BLM, _ = model.features(inputs_BL)
    hidden = hidden_BLM[:, first_scored:]
    targets = targets_BL[:, first_scored:]
    B, P, M = hidden.shape
    flat_h, flat_t = hidden.reshape(B * P, M), targets.reshape(B * P)
    out = torch.empty(B * P, dtype=torch.float32, device=hidden.device)
    for i in range(0, B * P, head_chunk):
        logits = model.head(flat_h[i : i + head_chunk]).float()
        out[i : i + head_chunk] = F.cross_entropy(logits, flat_t[i : i + head_chunk], reduction="none")
    return out.view(B, P)


def evaluate_length(model, tokens, plan: Plan, *, batch_tokens: int = 16384, buckets_per_octave: int = 4,
                    device: str | torch.device = "cpu",
                    progress: Optional[Callable[[int], None]] = None) -> LengthResult:
    """Score `plan` on `tokens` (a 1-D integer array, e.g. a memmap). `progress(n)` is called
    with the number of windows finished since the last call."""
    edges = bucket_edges(plan.length, buckets_per_octave)
    res = LengthResult(length=plan.length, bucket_edges=edges)
    reason = unsupported_reason(model, plan.length)
    if reason:
        res.status, res.reason = "unsupported", reason
        if progress:
            progress(plan.n_windows())
        return res
    t0 = time.perf_counter()
    n_buckets = len(edges) - 1
    bucket_of = torch.bucketize(torch.arange(plan.length), torch.tensor(edges[1:]), right=True)
    bucket_sum = torch.zeros(n_buckets, dtype=torch.float64)
    bucket_n = torch.zeros(n_buckets, dtype=torch.int64)
    total, count = 0.0, 0
    per_batch = max(1, batch_tokens // plan.length)
    groups: dict[int, list[Window]] = {}

    def flush(first_scored: int, batch: list[Window]) -> None:
        nonlocal total, count
        rows = np.stack([np.asarray(tokens[w.start : w.start + w.length + 1], dtype=np.int64) for w in batch])
        seq = torch.from_numpy(rows).to(device)
        losses = window_losses(model, seq[:, :-1], seq[:, 1:], first_scored).double().cpu()
        total += float(losses.sum())
        count += losses.numel()
        pos = bucket_of[first_scored:]
        bucket_sum.index_add_(0, pos, losses.sum(0))
        bucket_n.index_add_(0, pos, torch.full_like(pos, len(batch)))
        res.windows += len(batch)
        if progress:
            progress(len(batch))

    # Windows with the same scored span are batched together, in plan order.
    for w in plan.windows():
        batch = groups.setdefault(w.first_scored, [])
        batch.append(w)
        if len(batch) == per_batch:
            flush(w.first_scored, groups.pop(w.first_scored))
    for first_scored, batch in groups.items():
        flush(first_scored, batch)

    res.loss = total / count
    res.ppl = perplexity(res.loss)
    res.tokens_scored = count
    res.tokens_processed = res.windows * plan.length
    res.bucket_tokens = bucket_n.tolist()
    res.bucket_loss = [float(s / n) if n else None for s, n in zip(bucket_sum.tolist(), bucket_n.tolist())]
    res.seconds = round(time.perf_counter() - t0, 2)
    return res
