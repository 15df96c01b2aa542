"""A data module's loaders, one per stage, over its splits: shuffled and sharded across data-parallel ranks for
training, whole on every rank for evaluation."""

from __future__ import annotations

from typing import Any

import datasets
import lightning.pytorch as pl
from torch.utils.data import DataLoader, DistributedSampler

from distill.data.resumable import ResumableLoader, replay_generator
from distill.data.sampler import data_parallel_rank


class SplitLoaders:
    """Lightning's train/val/test loaders and the pruners' calibration loader, all from ``dataloader(split, ...)``
    over ``self.splits``. Its default serves rows of fixed length (:func:`split_loader`); a data module whose rows
    need a collator overrides it."""

    splits: dict[str, datasets.Dataset]
    batch_size: int
    eval_batch_size: int

    def dataloader(
        self, split: str, batch_size: int, shuffle: bool, shard: tuple[int, int] | None = None
    ) -> DataLoader:
        return split_loader(self, self.splits[split], batch_size, shuffle, shard)

    # The training loader Lightning iterates, and a checkpoint's state for it that came before it.
    _train_loader: ResumableLoader | None = None
    _train_state: dict[str, Any] | None = None

    def train_dataloader(self) -> DataLoader:
        return self.resumable(self.dataloader("train", self.batch_size, shuffle=True))

    def resumable(self, loader: ResumableLoader) -> ResumableLoader:
        """``loader`` as the fit's training loader: the one whose place the data module's state holds."""
        self._train_loader = loader
        if self._train_state is not None:
            loader.load_state_dict(self._train_state)
            self._train_state = None
        return loader

    # Lightning checkpoints the training loader's state itself, but loses it on resume when `configure_optimizers`
    # reads `trainer.estimated_stepping_batches` (Lightning issue #20550), as distillation does: the data module's
    # own state, which Lightning restores before the loader is built (after, under FSDP), carries it too.
    def state_dict(self) -> dict[str, Any]:
        return {} if self._train_loader is None else {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._train_state = state.get("train_loader")
        if self._train_loader is not None and self._train_state is not None:
            self.resumable(self._train_loader)

    def calibration_dataloader(self) -> DataLoader:
        """Training batches for a structured or one-shot pruner to measure importance on, in one process."""
        self.setup("fit")
        return self.dataloader("train", self.batch_size, shuffle=True, shard=(0, 1))

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("validation", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test", self.eval_batch_size, shuffle=False)


def check_batch_sizes(batch_size: int, eval_batch_size: int) -> None:
    """Every data module's batch sizes are at least 1 (part of each one's ``check_settings``)."""
    for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if value < 1:
            raise ValueError(f"{name}={value!r} must be >= 1")


def split_loader(
    datamodule: pl.LightningDataModule,
    dataset: datasets.Dataset,
    batch_size: int,
    shuffle: bool,
    shard: tuple[int, int] | None = None,
) -> DataLoader:
    """A loader over one split of fixed-length rows.

    Shuffled loaders draw a seeded order per epoch (Lightning sets the sampler's epoch) and give each
    data-parallel rank disjoint rows; the few that do not divide among the ranks are dropped for the
    epoch. They resume mid-epoch from a checkpoint (:class:`~distill.data.resumable.ResumableLoader`).
    ``shard`` (rank, number of ranks) replaces the attached trainer's. Unshuffled loaders are whole on
    every rank, so held-out metrics count every token once.
    """
    workers = datamodule.num_workers
    if not shuffle:
        return DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    rank, replicas = shard or data_parallel_rank(datamodule)
    sampler = DistributedSampler(
        dataset, num_replicas=replicas, rank=rank, shuffle=True, seed=datamodule.seed, drop_last=True
    )
    generator = replay_generator(shard, datamodule.seed)
    return ResumableLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, generator=generator)
