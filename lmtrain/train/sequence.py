"""Sequence parallelism on DeepSpeed Ulysses (`trainer.sequence_parallel: N`).

The W training processes form W/N groups of N consecutive ranks ([0, N), [N, 2N), ...). A
group trains on one micro-batch: every rank of it reads the same windows, and rank r of the
group computes positions [r L/N, (r+1) L/N) of every sequence (lmtrain/model/sequence.py).
Around each attention kernel DeepSpeed's `DistributedAttention` exchanges query, key and
value shards by an all-to-all within the group (sequence shards -> head shards), and the
output back. The groups are data parallel, as ranks are without sequence parallelism: the
sampler deals micro-batches to groups, not ranks.

Gradients: each rank's loss is the mean over its positions, and the all-to-all's backward
brings every rank the gradients of all the group's losses with respect to its activations.
Averaging gradients over all W ranks (DDP, or ZeRO's reduction at any stage) therefore
gives the gradient of the mean loss over the global batch, the same as one process
computing the whole batch: no separate sequence-parallel reduction is needed.

Communication per layer and micro-batch: four all-to-alls forward (q, k, v, output) and four
backward, each moving (N-1)/N of a B x L/N x M activation per rank.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lmtrain.model.sequence import SequenceShard


def data_parallel(rank: int, world: int, sequence_parallel: int) -> tuple[int, int]:
    """(this rank's data-parallel index, the data-parallel world): sequence groups count once."""
    return rank // sequence_parallel, max(1, world // sequence_parallel)


class _CallGiven(nn.Module):
    """DistributedAttention's `local_attention`: calls the function handed to each forward,
    so one exchange serves every layer and kernel."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, local) -> Tensor:
        return local(q, k, v)


def ulysses_shard(n: int, rank: int, world: int) -> SequenceShard:
    """This rank's `SequenceShard`, exchanging through DeepSpeed's DistributedAttention over its
    group. Collective: every rank calls it, in the same order (it creates the groups)."""
    if world % n:
        raise ValueError(f"trainer.sequence_parallel={n} does not divide the {world} training processes")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported
    import deepspeed.comm as ds_comm
    from deepspeed.sequence.layer import DistributedAttention

    if not ds_comm.is_initialized():  # DDP: DeepSpeed's comm layer wraps torch's process group
        ds_comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)
    groups = [dist.new_group(list(range(g * n, (g + 1) * n))) for g in range(world // n)]
    # Inputs B x L/N x H x D (batch first): scatter the heads (dim 2), gather the sequence (dim 1).
    engine = DistributedAttention(_CallGiven(), groups[rank // n], scatter_idx=2, gather_idx=1)

    def exchange(local, q_BlHD: Tensor, k_BlHD: Tensor, v_BlHD: Tensor) -> Tensor:
        return engine(q_BlHD, k_BlHD, v_BlHD, 0, None, local)

    return SequenceShard(index=rank % n, count=n, exchange=exchange)
