"""Sequence parallelism as the model sees it: one process's share of a sequence.

Under `trainer.sequence_parallel: N` each sequence of L positions is split across the N
processes of a group: process r embeds, projects, normalises and feeds forward the positions
[r L/N, (r+1) L/N) only. Attention needs every position, so around each kernel call an
exchange (DeepSpeed Ulysses' all-to-all, installed by lmtrain/train/sequence.py; the model
never imports a distributed engine) trades the sequence split for a head split: the kernel
sees all L positions of H/N heads, r's heads being [r H/N, (r+1) H/N), and its output is
traded back. So a kernel whose math is per head (`Capabilities.head_shards`) runs unchanged:
its positions, document ids and global-token flags are those of the whole sequence, and its
positional scheme is the one those heads see (`positions.HeadSubset`).

Every process receives the whole window of token ids (L integers), so the document of each
position (document masking) and the positions within documents are computed on the whole
sequence, exactly as without sequence parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

# (local, q, k, v) -> o with q, k, v, o of shape B x L/N x H x D (this process's positions, all
# heads); `local(q, k, v)` is called with B x L x H/N x D (all positions, this process's heads)
# and returns the same shape.
Exchange = Callable[[Callable[[Tensor, Tensor, Tensor], Tensor], Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class SequenceShard:
    index: int  # this process's place in its group, 0..count-1
    count: int  # processes a sequence is split across (N)
    exchange: Exchange

    def positions(self, length: int) -> slice:
        """This process's positions of a sequence of `length` (a multiple of `count`)."""
        if length % self.count:
            raise ValueError(f"a sequence of {length} positions does not split into {self.count} equal shards "
                             "(trainer.sequence_parallel must divide data.seq_len)")
        part = length // self.count
        return slice(self.index * part, (self.index + 1) * part)

    def heads(self, n_heads: int) -> slice:
        """The heads this process attends with."""
        part = n_heads // self.count
        return slice(self.index * part, (self.index + 1) * part)
