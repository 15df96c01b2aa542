"""CompressionAwareCheckpoint: the best checkpoint of a compressed run comes from its final student."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from distill.callbacks.checkpoint import CompressionAwareCheckpoint
from distill.callbacks.compression import CompressionCallback
from distill.callbacks.magnitude_pruning import MagnitudePruning
from distill.callbacks.nm_sparsity import NMSparsity
from distill.callbacks.qat import QuantizationAwareTraining
from tests.callback_helpers import ENCODER, batches, make_trainer, tiny_module


class ScriptedScores(pl.LightningModule):
    """Logs the given val/acc values, one per validation."""

    def __init__(self, scores: list[float]) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.scores = iter(scores)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def validation_step(self, batch, batch_idx) -> None:
        self.layer(batch)

    def on_validation_epoch_end(self) -> None:
        self.log("val/acc", next(self.scores))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class CompleteAfter(CompressionCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def complete(self, global_step: int) -> bool:
        return global_step > self.step

    def describe(self) -> dict[str, int]:
        return {"complete_after": self.step}


def checkpoint(tmp_path: Path, **kwargs) -> CompressionAwareCheckpoint:
    options = dict(dirpath=tmp_path / "ckpt", filename="step_{step:06d}", monitor="val/acc", mode="max")
    return CompressionAwareCheckpoint(**(options | {"auto_insert_metric_name": False, "save_last": True} | kwargs))


def fit_scripted(tmp_path: Path, scores: list[float], callbacks: list) -> CompressionAwareCheckpoint:
    saver = checkpoint(tmp_path)
    trainer = make_trainer(tmp_path, [*callbacks, saver], max_steps=12, val_check_interval=2, enable_checkpointing=True)
    loader = DataLoader(torch.randn(8, 2), batch_size=2)
    trainer.fit(ScriptedScores(scores), train_dataloaders=loader, val_dataloaders=loader)
    return saver


SCORES = [0.9, 0.8, 0.5, 0.7, 0.6, 0.65]  # validations at steps 2, 4, ..., 12


def test_best_is_the_best_validation_after_compression_completes(tmp_path: Path) -> None:
    saver = fit_scripted(tmp_path, SCORES, [CompleteAfter(4), CompleteAfter(2)])
    assert Path(saver.best_model_path).name == "step_000008.ckpt"  # 0.7; a plain ModelCheckpoint keeps 0.9
    assert float(saver.best_model_score) == pytest.approx(0.7)
    assert Path(saver.last_model_path).name == "last.ckpt" and Path(saver.last_model_path).exists()


def test_without_compression_it_is_a_plain_model_checkpoint(tmp_path: Path) -> None:
    assert Path(fit_scripted(tmp_path, SCORES, []).best_model_path).name == "step_000002.ckpt"


def test_no_complete_validation_leaves_no_best(tmp_path: Path) -> None:
    saver = fit_scripted(tmp_path, SCORES, [CompleteAfter(100)])
    assert saver.best_model_path == ""  # train.py then tests the student as fit left it
    assert Path(saver.last_model_path).exists()  # resuming still works


@pytest.mark.slow
def test_pruning_run_ranks_only_validations_at_final_sparsity(tmp_path: Path) -> None:
    pruning = MagnitudePruning(final_sparsity=0.5, start_step=0, end_step=4, frequency=2, include=[ENCODER])
    saver = checkpoint(tmp_path, save_top_k=-1)
    trainer = make_trainer(tmp_path, [pruning, saver], max_steps=12, val_check_interval=2, enable_checkpointing=True)
    trainer.fit(tiny_module(), train_dataloaders=batches(8, 2), val_dataloaders=batches(4, 2))
    ranked = sorted(path.name for path in (tmp_path / "ckpt").glob("step_*.ckpt"))
    assert ranked == [f"step_{step:06d}.ckpt" for step in (6, 8, 10, 12)]
    for name in ranked:
        weights = torch.load(tmp_path / "ckpt" / name, weights_only=False)["state_dict"]
        linear = weights["student.bert.encoder.layer.0.intermediate.dense.weight"]
        assert (linear == 0).float().mean() == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("callback", "last_change"),
    [
        (MagnitudePruning(final_sparsity=0.5, start_step=3, end_step=9, frequency=2), 9),
        (NMSparsity(prune_step=5), 5),
        (QuantizationAwareTraining(start_step=7), 7),
    ],
    ids=["gmp", "nm", "qat"],
)
def test_each_compression_callback_is_complete_once_its_last_change_is_trained(callback, last_change: int) -> None:
    assert not callback.complete(last_change)
    assert callback.complete(last_change + 1)
