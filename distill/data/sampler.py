"""Length-grouped batching: batches of similar-length examples, visited in random order.

Random batches of short, uneven texts (SST-2: mean 13 tokens) pad every example to the longest
in its batch, about 3x the real tokens. Sorting within shuffled mega-batches of
``batch_size * group_size`` examples keeps the order random at the scale of an epoch while
padding little, the same idea as Hugging Face Trainer's ``group_by_length``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Yields lists of indices; reshuffled each epoch via ``set_epoch`` (Lightning calls it).

    Under data parallelism every rank builds the same shuffled batch list (same seed and epoch)
    and takes every ``num_replicas``-th batch from ``rank``, the tail trimmed so that all ranks
    run the same number of steps.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        group_size: int = 50,
        seed: int = 0,
        rank: int = 0,
        num_replicas: int = 1,
    ) -> None:
        if batch_size < 1 or group_size < 1:
            raise ValueError(f"batch_size={batch_size!r} and group_size={group_size!r} must be >= 1")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank!r} must be in [0, num_replicas={num_replicas!r})")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.group_size = group_size
        self.seed = seed
        self.rank, self.num_replicas = rank, num_replicas
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def sampler(self) -> LengthGroupedBatchSampler:
        """Lightning calls ``set_epoch`` on a loader's ``sampler`` and ``batch_sampler.sampler``, never on
        the batch sampler itself: without this every epoch would replay the first epoch's order."""
        return self

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size) // self.num_replicas

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        span = self.batch_size * self.group_size
        batches = []
        for start in range(0, len(order), span):
            group = sorted(order[start : start + span], key=self.lengths.__getitem__, reverse=True)
            batches += [group[i : i + self.batch_size] for i in range(0, len(group), self.batch_size)]
        positions = torch.randperm(len(batches), generator=generator).tolist()
        for position in positions[self.rank : len(self) * self.num_replicas : self.num_replicas]:
            yield batches[position]


def data_parallel_rank(datamodule: Any) -> tuple[int, int]:
    """(rank, number of ranks) of the trainer a data module is attached to; (0, 1) before it is."""
    trainer = getattr(datamodule, "trainer", None)
    if trainer is None:
        return 0, 1
    return trainer.global_rank, trainer.world_size
