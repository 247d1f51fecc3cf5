"""Training data: fixed-length windows over the packed token files.

Window w of a split covers tokens [w*L, w*L + L + 1): inputs are the first L, targets the
last L. The training order is a function of the *global sample index* g alone:
epoch = g // W, and within an epoch a permutation of the W windows seeded by (seed, epoch).
Micro-step t of rank r (of R ranks, micro-batch b) takes g in [t*b*R + r*b, t*b*R + (r+1)*b).
So resuming needs only the number of samples consumed, and a change of world size at the
same global batch keeps exactly the same global order.

A length curriculum (data.seq_len "512,2048@2000,...", `config.length_phases`) trains phase i
after S_i optimizer steps on windows of its own length L_i, with its own micro-batch b_i; within
a phase the order is the one above, over the windows of length L_i, counted from the phase's
first sample. The phase and the sample within it follow from the samples consumed (each
earlier phase consumed steps x b_i x ranks x accumulation), so resuming still needs nothing
else, and a change of length between two checkpoints resumes exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data_pipelines.shards import DataDirError, check_matches, check_window, open_tokens, read_meta, verify_data_dir
from lmtrain.config import LengthPhase, length_phases


def epoch_permutation(n_windows: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    return torch.randperm(n_windows, generator=g)


class GlobalSampler(Sampler[int]):
    """Infinite, deterministic, resumable stream of window indices for one rank."""

    def __init__(self, n_windows: int, *, seed: int, micro_batch: int, rank: int = 0, world_size: int = 1,
                 start_sample: int = 0):
        if n_windows < 1:
            raise ValueError("the training split holds no complete window; lower data.seq_len or add data")
        self.n, self.seed, self.b, self.rank, self.world = n_windows, seed, micro_batch, rank, world_size
        if start_sample % (micro_batch * world_size):
            raise ValueError(f"cannot resume at sample {start_sample}: not a multiple of the global micro-batch "
                             f"{micro_batch * world_size} (data.batch_size x devices)")
        self.start_sample = start_sample
        self._perm: Optional[tuple[int, torch.Tensor]] = None

    def window(self, g: int) -> int:
        """The window at global sample index g."""
        epoch, i = divmod(g, self.n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, epoch_permutation(self.n, self.seed, epoch))
        return int(self._perm[1][i])

    def global_indices(self) -> Iterator[int]:
        step = self.b * self.world
        t = self.start_sample // step
        while True:
            base = t * step + self.rank * self.b
            yield from range(base, base + self.b)
            t += 1

    def __iter__(self) -> Iterator[int]:
        for g in self.global_indices():
            yield self.window(g)


class PhasedBatches(Sampler[list]):
    """One rank's micro-batches under a length curriculum: lists of (length, window) keys of
    `PhasedWindows`, phase after phase, from the sample `start_sample` of the whole run."""

    def __init__(self, phases: list[LengthPhase], n_windows: dict[int, int], *, seed: int, accumulate: int,
                 rank: int = 0, world_size: int = 1, start_sample: int = 0):
        self.phases, self.n_windows, self.seed, self.acc = phases, n_windows, seed, accumulate
        self.rank, self.world = rank, world_size
        self.phase, self.phase_sample = self.locate(start_sample)

    def locate(self, sample: int) -> tuple[int, int]:
        """(phase, samples consumed within it) at the run's global sample `sample`."""
        for i, (p, nxt) in enumerate(zip(self.phases, self.phases[1:])):
            size = (nxt.start_step - p.start_step) * p.batch_size * self.world * self.acc
            if sample < size:
                return i, sample
            sample -= size
        return len(self.phases) - 1, sample

    def __iter__(self):
        phase, start = self.phase, self.phase_sample
        while True:
            p = self.phases[phase]
            last = phase == len(self.phases) - 1
            steps = None if last else (self.phases[phase + 1].start_step - p.start_step) * self.acc
            sampler = GlobalSampler(self.n_windows[p.seq_len], seed=self.seed, micro_batch=p.batch_size,
                                    rank=self.rank, world_size=self.world, start_sample=start)
            t0 = start // (p.batch_size * self.world)
            windows = iter(sampler)
            t = t0
            while steps is None or t < steps:
                yield [(p.seq_len, next(windows)) for _ in range(p.batch_size)]
                t += 1
            phase, start = phase + 1, 0


class PhasedWindows(Dataset):
    """(length, window) -> the window of that length (a WindowDataset per length)."""

    def __init__(self, sets: dict[int, "WindowDataset"]):
        self.sets = sets

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        length, w = key
        return self.sets[length][w]


class WindowDataset(Dataset):
    """Window w -> int64 tensor of L+1 tokens. The memmap opens lazily in each worker. With
    `vocab_size`, every window's ids are checked to be in the vocabulary as it is read."""

    def __init__(self, data_dir: str | Path, split: str, seq_len: int, vocab_size: Optional[int] = None):
        self.data_dir, self.split, self.seq_len, self.vocab_size = str(data_dir), split, seq_len, vocab_size
        self._tokens = None
        n_tokens = read_meta(data_dir)["splits"][split]["tokens"]
        self.n_windows = max(0, (n_tokens - 1) // seq_len)

    @property
    def tokens(self) -> np.memmap:
        if self._tokens is None:
            self._tokens = open_tokens(self.data_dir, self.split)
        return self._tokens

    def __len__(self) -> int:
        return self.n_windows

    def __getitem__(self, w: int) -> torch.Tensor:
        start = w * self.seq_len
        window = self.tokens[start : start + self.seq_len + 1]
        if self.vocab_size is not None:
            check_window(window, self.vocab_size, Path(self.data_dir) / f"{self.split}.bin", start)
        return torch.from_numpy(window.astype(np.int64))

    def __getstate__(self):
        return {**self.__dict__, "_tokens": None}


def val_windows(n_windows: int, count: int) -> list[int]:
    """`count` windows spread evenly over the split (the same every evaluation)."""
    count = min(count, n_windows)
    return [int(i) for i in np.linspace(0, n_windows - 1, num=count).round()] if count else []


def validation_sample(val_set: "WindowDataset", count: int) -> torch.Tensor:
    """`count` windows of L + 1 tokens spread evenly over the validation split (the same ones
    every time): count x (L + 1)."""
    return torch.stack([val_set[w] for w in val_windows(len(val_set), count)])


def _loader_generator(seed: int) -> torch.Generator:
    # An explicit generator keeps the DataLoader from drawing on the global RNG.
    return torch.Generator().manual_seed(seed)


class TokenDataModule(pl.LightningDataModule):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.meta = read_meta(cfg.data.dir)
        check_matches(self.meta, vocab_size=cfg.data.vocab_size, data_dir=cfg.data.dir)
        verify_data_dir(cfg.data.dir, cfg.data.vocab_size)
        vocab = cfg.data.vocab_size
        self.phases = length_phases(cfg.data)
        self.train_sets = {p.seq_len: WindowDataset(cfg.data.dir, "train", p.seq_len, vocab) for p in self.phases}
        self.train_set = self.train_sets[cfg.data.seq_len]
        self.val_set = WindowDataset(cfg.data.dir, "val", cfg.data.seq_len, vocab)
        if self.train_set.n_windows < 1:
            raise DataDirError(
                f"data.seq_len: the training split of {cfg.data.dir} has "
                f"{self.meta['splits']['train']['tokens']:,} tokens, fewer than one window of "
                f"{cfg.data.seq_len + 1}; lower data.seq_len or data.val_fraction, or add data")
        if self.val_set.n_windows < 1:
            raise DataDirError(
                f"data.seq_len: the validation split of {cfg.data.dir} has fewer than {cfg.data.seq_len + 1} tokens; "
                "raise data.val_fraction or lower data.seq_len"
            )

    def _rank_world(self) -> tuple[int, int]:
        """(data-parallel rank, data-parallel world): the ranks of a sequence-parallel group read
        the same windows (lmtrain/train/sequence.py)."""
        from lmtrain.train.sequence import data_parallel

        t = getattr(self, "trainer", None)
        if t is None:
            return 0, 1
        return data_parallel(t.global_rank, t.world_size, self.cfg.trainer.sequence_parallel)

    def train_dataloader(self, start_sample: Optional[int] = None) -> DataLoader:
        rank, world = self._rank_world()
        if start_sample is None:
            start_sample = getattr(self.trainer.lightning_module, "consumed_samples", 0) if self.trainer else 0
        if len(self.phases) > 1:
            batches = PhasedBatches(self.phases, {L: s.n_windows for L, s in self.train_sets.items()},
                                    seed=self.cfg.run.seed, accumulate=self.cfg.trainer.accumulate_grad_batches,
                                    rank=rank, world_size=world, start_sample=start_sample)
            return self._loader(PhasedWindows(self.train_sets), batch_sampler=batches)
        sampler = GlobalSampler(self.train_set.n_windows, seed=self.cfg.run.seed, micro_batch=self.cfg.data.batch_size,
                                rank=rank, world_size=world, start_sample=start_sample)
        return self._loader(self.train_set, sampler)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        per_rank = self.cfg.data.val_batches * self.cfg.data.batch_size
        windows = val_windows(self.val_set.n_windows, per_rank * world)
        windows = windows[: len(windows) // world * world] or windows
        return self._loader(self.val_set, windows[rank::world])

    def _loader(self, dataset, sampler=None, batch_sampler=None) -> DataLoader:
        workers = self.cfg.data.num_workers
        batch = {"batch_sampler": batch_sampler} if batch_sampler is not None else {
            "batch_size": self.cfg.data.batch_size, "sampler": sampler}
        return DataLoader(dataset, **batch, num_workers=workers,
                          pin_memory=torch.cuda.is_available(), persistent_workers=False,
                          prefetch_factor=4 if workers else None, generator=_loader_generator(self.cfg.run.seed))
