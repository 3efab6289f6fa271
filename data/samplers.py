"""Samplers: repeated augmentation for training, exact sharding for evaluation, and the training
batches, each with a seed of its own (so that an epoch can start at any batch).

All work for one process (``num_replicas=1, rank=0``) and expose ``set_epoch`` so the
training loop can call it on every sampler every epoch.
"""
from __future__ import annotations

from typing import Iterator, List, Sized, Tuple

import numpy as np
import torch
from torch.utils.data import Sampler


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A torch generator seeded from the pair (seed, epoch); distinct pairs give unrelated streams."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class RepeatAugSampler(Sampler[int]):
    """Repeated augmentation (Hoffer et al. 2020; DeiT's ``RASampler``): every image of a
    shuffled permutation appears ``num_repeats`` times in a row, and that sequence is dealt to
    the ranks in turn (position p goes to rank p mod W), so the copies of one image land on
    ``min(num_repeats, W)`` different processes, each with its own random augmentation.

    Epoch length: ``len(dataset) // num_replicas`` per rank, i.e. the global epoch has the size
    of the dataset, as in DeiT, so an epoch sees about ``len / num_repeats`` distinct images.
    (DeiT also rounds the dataset size down to a multiple of 256 first; that only drops up to
    255 samples and is left out here.) The permutation depends on (seed, epoch) only, so every
    rank computes the same one and picks its own share.
    """

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0, num_repeats: int = 3, seed: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} not in [0, {num_replicas})")
        if num_repeats < 1:
            raise ValueError(f"num_repeats must be >= 1, got {num_repeats}")
        self.dataset_len = len(dataset)
        self.num_replicas, self.rank, self.num_repeats, self.seed = num_replicas, rank, num_repeats, seed
        self.num_samples = self.dataset_len // num_replicas
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        perm = torch.randperm(self.dataset_len, generator=epoch_generator(self.seed, self.epoch))
        repeated = perm.repeat_interleave(self.num_repeats)  # (len * num_repeats,)
        mine = repeated[self.rank: self.num_samples * self.num_replicas: self.num_replicas]
        return iter(mine.tolist())

    def __len__(self) -> int:
        return self.num_samples


class ShardedEvalSampler(Sampler[int]):
    """Exact distributed evaluation: rank r takes indices r, r + W, r + 2W, ... with no padding
    and no duplicates, so the ranks' counts sum to the dataset size (ranks may differ by one)."""

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} not in [0, {num_replicas})")
        self.indices = range(rank, len(dataset), num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """No-op: evaluation order does not depend on the epoch."""

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SeededBatchSampler(Sampler[Tuple[int, List[int]]]):
    """One rank's training batches: ``sampler``'s epoch order cut into whole batches (the last,
    partial one dropped), each as ``(seed, indices)``. The seed is a function of (seed, rank,
    epoch, batch position) alone; ``data.datasets.SeededBatches`` seeds the augmentation from it
    before decoding the batch, so what a batch looks like depends on nothing decoded before it,
    in any process. An epoch can therefore start at any batch (``set_epoch(epoch, start_batch)``:
    a mid-epoch resume) without decoding the ones before, and the DataLoader's worker count
    changes no image."""

    def __init__(self, sampler: Sampler[int], batch_size: int, seed: int = 0, rank: int = 0):
        self.sampler, self.batch_size, self.seed, self.rank = sampler, batch_size, seed, rank
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The epoch to deal (also for ``sampler``) and the batch its iteration starts at."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[Tuple[int, List[int]]]:
        n, size = len(self), self.batch_size
        if self.start_batch >= n:
            return
        order = list(self.sampler)
        seeds = np.random.SeedSequence([self.seed, self.rank, self.epoch]).generate_state(n, dtype=np.uint64)
        for b in range(self.start_batch, n):
            yield int(seeds[b]), order[b * size: (b + 1) * size]

    def __len__(self) -> int:
        """Batches in a whole epoch (also when it starts later: the loop counts its steps by it)."""
        return len(self.sampler) // self.batch_size
