"""Batch order that depends only on (seed, epoch).

Every DDP rank must evaluate the same batch (the ranks split the *queries*, not the data), and a resumed run
must see the same batches as an uninterrupted one. A sampler whose permutation is a pure function of the seed
and the epoch gives both by construction; Lightning calls :meth:`set_epoch` at the start of every epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["SeededRandomSampler"]


class SeededRandomSampler(Sampler[int]):
    """Random permutation of ``range(num_samples)`` drawn from ``seed + epoch``.

    Args:
        num_samples: dataset length.
        seed: base seed.
        shuffle: if ``False``, yields ``0..num_samples-1`` in order.
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True) -> None:
        if num_samples < 0:
            raise ValueError(f"Expected argument `num_samples` to be >= 0, but got {num_samples}.")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (called by Lightning before each epoch)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_samples))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=gen).tolist())

    def __len__(self) -> int:
        return self.num_samples
