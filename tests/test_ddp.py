"""Two CPU processes (gloo): every rank ends with the same masks."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from distill.callbacks.magnitude_pruning import MagnitudePruning
from distill.callbacks.nm_sparsity import NMSparsity
from tests.callback_helpers import batches, make_trainer, tiny_module

pytestmark = pytest.mark.distributed


class DumpMasks(pl.Callback):
    """Each rank writes its callbacks' masks and its student weights."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer, module) -> None:
        masks = {
            f"{type(callback).__name__}/{name}": mask.cpu()
            for callback in trainer.callbacks
            for name, mask in getattr(callback, "masks", {}).items()
        }
        weights = {name: value.cpu() for name, value in module.student.state_dict().items()}
        torch.save({"masks": masks, "weights": weights}, self.folder / f"rank{trainer.global_rank}.pt")


def test_two_ranks_hold_identical_masks(tmp_path: Path) -> None:
    callbacks = [
        MagnitudePruning(
            final_sparsity=0.5, start_step=0, end_step=4, frequency=2, include=["student.*attention.self.*"]
        ),
        NMSparsity(backend="native", include=["student.*intermediate.dense", "student.*layer.?.output.dense"]),
        DumpMasks(tmp_path),
    ]
    trainer = make_trainer(tmp_path, callbacks, 6, strategy="ddp_spawn", devices=2)
    trainer.fit(tiny_module(), train_dataloaders=batches(32))
    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    assert len(rank0["masks"]) == 10  # query/key/value pruned, intermediate/output 2:4, in 2 layers
    assert all(torch.equal(mask, rank1["masks"][name]) for name, mask in rank0["masks"].items())
    assert all(torch.equal(value, rank1["weights"][name]) for name, value in rank0["weights"].items())
