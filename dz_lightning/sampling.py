"""Batch order that depends only on (seed, epoch), resumable in the middle of an epoch.

Every DDP rank must evaluate the same batch (the ranks split the *queries*, not the data), and a resumed run
must see the same batches as an uninterrupted one. A sampler whose permutation is a pure function of the seed
and the epoch gives both by construction; Lightning calls :meth:`SeededRandomSampler.set_epoch` at the start of
every epoch. :class:`ResumableDataLoader` adds the position inside the epoch to checkpoints (Lightning saves and
restores the ``state_dict`` of stateful data loaders), so a run resumed from a mid-epoch checkpoint
(``ModelCheckpoint(every_n_train_steps=...)``, or one saved on an interrupt) continues with the next batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler

__all__ = ["ResumableDataLoader", "SeededRandomSampler"]


class SeededRandomSampler(Sampler[int]):
    """Random permutation of ``range(num_samples)`` drawn from ``seed + epoch``.

    Its :meth:`state_dict` holds the epoch and the number of indices to skip at the start of the next iteration
    (set by :meth:`load_state_dict` when a run resumes inside an epoch; it applies to one iteration only).

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
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (called by Lightning before each epoch)."""
        self.epoch = epoch

    def skip_next(self, count: int) -> None:
        """Leave out the first ``count`` indices of the next iteration (only that one), to resume inside an epoch."""
        if count < 0:
            raise ValueError(f"Expected argument `count` to be >= 0, but got {count}.")
        self._skip = count

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "seed": self.seed, "skip": self._skip}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(
                f"The checkpoint's sampler was seeded with {state['seed']}, this one with {self.seed}: resuming would "
                "change the batch order. Use the data seed the run was started with."
            )
        self.epoch = int(state["epoch"])
        self.skip_next(int(state["skip"]))

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        if not self.shuffle:
            return iter(range(skip, self.num_samples))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=gen)[skip:].tolist())

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A :class:`~torch.utils.data.DataLoader` whose position inside the epoch is saved in checkpoints.

    It counts the batches it hands out in the current epoch; ``state_dict`` returns that count with the sampler's
    state, and ``load_state_dict`` makes the next epoch's iteration start after them. With a
    :class:`SeededRandomSampler` (and the default batch sampler) the skipped batches are never loaded; with any
    other sampler they are drawn and dropped. The iteration starts at the first ``next()`` (not at ``iter()``), so
    the sampler's epoch is the one Lightning sets just before the epoch begins.

    Takes the same arguments as :class:`~torch.utils.data.DataLoader`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batches = 0  # handed out in the current iteration
        self._resume_batches = 0

    def state_dict(self) -> dict[str, Any]:
        sampler = self.sampler
        state = sampler.state_dict() if isinstance(sampler, SeededRandomSampler) else {}
        return {"batches": self._batches, "sampler": state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        batches = int(state["batches"])
        if batches < 0:
            raise ValueError(f"Expected a checkpointed batch count >= 0, but got {batches}.")
        if state.get("sampler") and isinstance(self.sampler, SeededRandomSampler):
            self.sampler.load_state_dict({**state["sampler"], "skip": 0})
        # a checkpoint from the end of an epoch: the next iteration is a whole new epoch
        self._resume_batches = 0 if batches >= len(self) else batches

    def __iter__(self) -> Iterator[Any]:
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        skip, self._resume_batches = self._resume_batches, 0
        self._batches = skip
        fast = (skip and isinstance(self.sampler, SeededRandomSampler) and isinstance(self.batch_sampler, BatchSampler)
                and self.batch_sampler.sampler is self.sampler)
        if fast:
            self.sampler.skip_next(skip * self.batch_sampler.batch_size)
        iterator = super().__iter__()
        if not fast:
            for _ in range(skip):
                next(iterator, None)
        for batch in iterator:
            self._batches += 1
            yield batch
