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


def quiet_trainer(tmp_path: Path, callbacks: list, **settings) -> pl.Trainer:
    """13 steps (up to 10 epochs) without logger, checkpoints or progress bar; ``settings`` go to the trainer."""
    return pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=13,
        max_epochs=10,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **settings,
    )


def fit(tmp_path: Path, grouped: bool, callbacks: list, ckpt_path: Path | None = None) -> Noisy:
    trainer = quiet_trainer(tmp_path, callbacks)
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
    assert torch.equal(straight.layer.weight, resumed.layer.weight)
    assert torch.equal(straight.layer.bias, resumed.layer.bias)


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


class TermAt(pl.Callback):
    """SIGTERMs its own process after optimizer step ``step``: the run saves last.ckpt there and exits 143."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class FinalStudent(pl.Callback):
    """Writes the student's weights as fit leaves them (last.ckpt follows the best validation's saves)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer, module) -> None:
        if trainer.is_global_zero:
            torch.save(module.student.state_dict(), self.path)


def into(folder: Path) -> list[str]:
    """Overrides that run in ``folder`` and keep the final student there."""
    keep = [f"+callbacks.final._target_={__name__}.FinalStudent", f"+callbacks.final.path={folder / 'final.pt'}"]
    return [f"paths.output_dir={folder}", *keep]


def loader_state(checkpoint: Path) -> dict:
    (state,) = torch.load(checkpoint, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    return state


def final_metrics(run: Path) -> dict:
    """metrics.json less what the clock decides."""
    metrics = json.loads((run / "metrics.json").read_text())
    timed = ("_s", "time", "per_s", "latency", "energy", "emissions", "power")
    return {key: value for key, value in metrics.items() if not any(part in key for part in timed)}


def assert_same_run(straight: Path, resumed: Path) -> None:
    expected, actual = final_metrics(straight), final_metrics(resumed)
    assert expected["complete"] and actual == expected
    weights = torch.load(resumed / "final.pt", weights_only=True)
    for name, value in torch.load(straight / "final.pt", weights_only=True).items():
        assert torch.equal(value, weights[name]), name


def interrupted_and_resumed(compose_train, overrides: list[str], tmp_path: Path, stop_at: int) -> Path:
    """Runs ``overrides`` in tmp_path/stopped, SIGTERMed after step ``stop_at`` (mid-epoch, asserted), then
    resumes it from its last.ckpt in the same folder, as the run's own resume line says; returns the folder."""
    run = tmp_path / "stopped"
    stop = [f"+callbacks.stop_at._target_={__name__}.TermAt", f"+callbacks.stop_at.step={stop_at}"]
    with pytest.raises(Interrupted):
        train(compose_train(*overrides, *into(run), *stop))
    last = run / "checkpoints" / "last.ckpt"
    state = loader_state(last)
    assert 0 < state["batches"] < state["length"], state  # the stop is mid-epoch
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not resumable.*")
        train(compose_train(*overrides, *into(run), f"ckpt_path={last}"))
    return run


def assert_resumes_exactly(compose_train, overrides: list[str], tmp_path: Path, max_steps: int, stop_at: int) -> None:
    """Two epochs, validated every 2 steps: the run stopped after ``stop_at`` and resumed ends as the straight one."""
    schedule = [f"trainer.max_steps={max_steps}", "trainer.max_epochs=2", "trainer.val_check_interval=2"]
    train(compose_train(*overrides, *schedule, *into(tmp_path / "straight")))
    resumed = interrupted_and_resumed(compose_train, [*overrides, *schedule], tmp_path, stop_at=stop_at)
    assert_same_run(tmp_path / "straight", resumed)


@pytest.mark.slow
def test_bert_to_tiny_with_perturbed_copies_resumes_exactly(compose_train, tiny_run_overrides, tmp_path) -> None:
    """Two epochs of 6 length-grouped batches, each with a perturbed copy; stopped at step 7 (epoch 1, batch 1)."""
    overrides = [
        *tiny_run_overrides,
        "experiment=bert_to_tiny",
        "debug=smoke",
        "data.augment.copies=1",
    ]
    assert_resumes_exactly(compose_train, overrides, tmp_path, max_steps=10, stop_at=7)


@pytest.mark.slow
def test_smollm2_to_small_resumes_exactly(compose_train, lm_teacher_dir: Path, corpus: Path, tmp_path: Path) -> None:
    """The pruned-student pipeline on text blocks: two epochs of 6 batches, stopped at step 7 (epoch 1, batch 1)."""
    overrides = [
        "experiment=smollm2_to_small",
        "debug=smoke",
        f"paths.cache_dir={tmp_path / 'cache'}",
        *tiny_run(lm_teacher_dir, corpus),
        "data.batch_size=2",
    ]
    assert_resumes_exactly(compose_train, overrides, tmp_path, max_steps=10, stop_at=7)


@pytest.mark.slow
def test_on_policy_run_resumes_exactly(compose_train, chat_teacher_dir: Path, poems: Path, tmp_path: Path) -> None:
    """Every step trains on the student's own samples (torch's generator): stopped at step 7 of 9 (epoch 1, batch 2)."""
    overrides = [
        *tiny_recipe_run(chat_teacher_dir, poems, tmp_path),
        "recipe=onpolicy",
        "distill.teacher_cache_topk=8",
        "distill.on_policy.probability=1.0",
        "data.batch_size=2",
    ]
    # The straight run builds the pruned student and the stores; the resumed one reads them from the cache, which
    # must leave the run's random stream as building them does.
    assert_resumes_exactly(compose_train, overrides, tmp_path, max_steps=9, stop_at=7)


def run_cli(overrides: list[str]) -> None:
    """``python -m distill.train`` in its own process: under trainer=ddp_cpu Lightning launches rank 1 itself."""
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "distill.train", *overrides]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "not resumable" not in done.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_resume_exactly(tiny_run_overrides: list[str], tmp_path: Path) -> None:
    """bert_to_tiny with perturbed copies on 2 CPU ranks (6 batches each per epoch): every rank's streams resume."""
    overrides = [
        *tiny_run_overrides,
        "experiment=bert_to_tiny",
        "debug=smoke",
        "trainer=ddp_cpu",
        "data.augment.copies=1",
        "data.batch_size=16",
        "trainer.max_steps=10",
        "trainer.max_epochs=2",
        "trainer.val_check_interval=2",
    ]
    run_cli([*overrides, *into(tmp_path / "straight")])
    run, checkpoint = tmp_path / "stopped", tmp_path / "stopped" / "mid.ckpt"
    stop = [f"+callbacks.stop_at._target_={__name__}.SaveAt", "+callbacks.stop_at.step=7"]
    run_cli([*overrides, *into(run), *stop, "+callbacks.stop_at.stop=true", f"+callbacks.stop_at.path={checkpoint}"])
    state = loader_state(checkpoint)
    assert 0 < state["batches"] < state["length"] and len(state["ranks"]) == 2, state
    run_cli([*overrides, *into(run), f"ckpt_path={checkpoint}"])
    assert_same_run(tmp_path / "straight", run)
