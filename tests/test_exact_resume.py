"""Stopped mid-epoch and resumed from its checkpoint, a run ends bitwise where an uninterrupted one does (CPU):
the training loaders' place and every random stream are in the checkpoint (distill/data/resumable.py)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.utils.data import DistributedSampler

from distill.data.resumable import ResumableLoader
from distill.data.sampler import LengthGroupedBatchSampler
from distill.pipeline.interrupt import Interrupted
from distill.train import train
from tests.test_causal_lm import tiny_run
from tests.test_prompts import tiny_recipe_run

REPO = Path(__file__).resolve().parents[1]
ROWS, BATCH = 20, 4  # 5 batches per epoch


class Noisy(pl.LightningModule):
    """Dropout, and draws from numpy's and Python's generators, on every step: all of them must resume."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer, self.dropout = nn.Linear(3, 1), nn.Dropout(0.5)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        noise = float(np.random.rand()) + random.random()
        return self.layer(self.dropout(batch)).square().mean() * (1 + noise)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SaveAt(pl.Callback):
    """Saves a checkpoint after optimizer step ``step`` and goes on, or stops there with ``stop``."""

    def __init__(self, step: int, path: str, stop: bool = False) -> None:
        self.step, self.path, self.stop = step, path, stop

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = self.stop


def rows_loader(grouped: bool) -> ResumableLoader:
    rows = torch.randn(ROWS, 3, generator=torch.Generator().manual_seed(1))
    if grouped:
        sampler = LengthGroupedBatchSampler(list(range(ROWS)), BATCH, group_size=2, seed=3)
        return ResumableLoader(rows, batch_sampler=sampler)
    sampler = DistributedSampler(rows, num_replicas=1, rank=0, shuffle=True, seed=3)
    return ResumableLoader(rows, batch_size=BATCH, sampler=sampler)


def fit(tmp_path: Path, grouped: bool, callbacks: list, ckpt_path: Path | None = None) -> Noisy:
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=13,
        max_epochs=10,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    module = Noisy()
    torch.manual_seed(123)  # a resumed process's own draws before fit must not matter
    trainer.fit(module, train_dataloaders=rows_loader(grouped), ckpt_path=ckpt_path)
    return module


@pytest.mark.parametrize("grouped", [False, True], ids=["distributed_sampler", "length_grouped"])
@pytest.mark.parametrize("stop_at", [7, 10], ids=["mid_epoch", "epoch_end"])
def test_a_resumed_loop_draws_what_an_uninterrupted_one_does(tmp_path: Path, grouped: bool, stop_at: int) -> None:
    checkpoint = tmp_path / "stopped.ckpt"
    straight = fit(tmp_path, grouped, [SaveAt(stop_at, str(checkpoint))])
    state = torch.load(checkpoint, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert (state["epoch"], state["batches"], state["length"]) == ((stop_at - 1) // 5, (stop_at - 1) % 5 + 1, 5)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not resumable.*")
        resumed = fit(tmp_path, grouped, [], ckpt_path=checkpoint)
    assert torch.equal(straight.layer.weight, resumed.layer.weight) and torch.equal(straight.layer.bias, resumed.layer.bias)


def saved_state(tmp_path: Path) -> dict:
    checkpoint = tmp_path / "stopped.ckpt"
    fit(tmp_path, False, [SaveAt(7, str(checkpoint), stop=True)])
    return torch.load(checkpoint, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]


def test_a_state_from_another_world_size_or_loader_is_refused(tmp_path: Path) -> None:
    state = saved_state(tmp_path)
    with pytest.raises(ValueError, match=r"saved by 2 data-parallel ranks and this run has world_size=1"):
        rows_loader(False).load_state_dict(state | {"ranks": state["ranks"] * 2})
    with pytest.raises(ValueError, match=r"had 4 batches per epoch and this run's has 5"):
        rows_loader(False).load_state_dict(state | {"length": 4})
