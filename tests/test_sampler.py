"""Length-grouped batching: a full permutation per epoch, reshuffled by epoch, far less padding."""

from __future__ import annotations

import random
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from distill.data.sampler import LengthGroupedBatchSampler


def padded_tokens(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)


def test_every_index_once_per_epoch_and_reshuffled() -> None:
    lengths = [random.Random(0).randint(1, 60) for _ in range(1000)]
    sampler = LengthGroupedBatchSampler(lengths, batch_size=32, group_size=4, seed=3)
    first = list(sampler)
    assert sorted(i for batch in first for i in batch) == list(range(1000))
    assert len(first) == len(sampler) == 32
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first


class RecordBatches(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[int, list[list[int]]] = {}

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).append(batch.tolist())
        return self.weight.sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_reshuffles_every_epoch() -> None:
    # Lightning calls set_epoch on batch_sampler.sampler only: a regression replayed epoch 0 each epoch.
    sampler = LengthGroupedBatchSampler(list(range(1, 41)), batch_size=4, group_size=2, seed=0)
    module = RecordBatches()
    trainer = pl.Trainer(
        max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(module, DataLoader(torch.arange(40), batch_sampler=sampler))
    orders = [module.seen[epoch] for epoch in range(3)]
    assert orders[0] != orders[1] != orders[2]
    for epoch, order in enumerate(orders):
        sampler.set_epoch(epoch)
        assert order == list(sampler)


def test_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="batch_size=0"):
        LengthGroupedBatchSampler([1, 2], batch_size=0)


@pytest.mark.slow
def test_grouped_batches_pad_much_less_on_sst2(tmp_path: Path, data_dir: Path, glue_module) -> None:
    settings = dict(train_limit=4096, batch_size=32)
    grouped = glue_module(data_dir, tmp_path, **settings, group_by_length=True)
    grouped.setup("fit")
    plain = glue_module(data_dir, tmp_path, **settings)
    plain.setup("fit")
    lengths = [len(ids) for ids in grouped.splits["train"]["input_ids"]]
    grouped_batches = list(grouped.train_dataloader().batch_sampler)
    plain_batches = list(plain.train_dataloader().batch_sampler)
    assert sorted(i for b in grouped_batches for i in b) == list(range(len(lengths)))
    assert padded_tokens(grouped_batches, lengths) * 2 < padded_tokens(plain_batches, lengths)
    batch = next(iter(grouped.train_dataloader()))
    assert batch["input_ids"].shape[0] == 32 and set(batch) >= {"input_ids", "attention_mask", "labels"}


def test_ranks_split_the_batches_evenly_and_disjointly() -> None:
    lengths = [i % 13 + 1 for i in range(103)]
    whole = list(LengthGroupedBatchSampler(lengths, batch_size=4, group_size=3, seed=5))
    shards = [list(LengthGroupedBatchSampler(lengths, 4, 3, seed=5, rank=r, num_replicas=3)) for r in range(3)]
    assert len({len(shard) for shard in shards}) == 1 and len(shards[0]) == len(whole) // 3
    seen = [tuple(batch) for shard in shards for batch in shard]
    assert len(seen) == len(set(seen)) and set(seen) <= {tuple(batch) for batch in whole}
