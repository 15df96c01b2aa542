"""Stopping mid-schedule and resuming from the checkpoint ends exactly where an uninterrupted run does."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from distill.callbacks.magnitude_pruning import MagnitudePruning
from distill.callbacks.nm_sparsity import NMSparsity
from distill.callbacks.qat import QuantizationAwareTraining, fake_quantized_layers
from tests.callback_helpers import ENCODER, batches, make_trainer, masks_of, tiny_module

# One batch per epoch: the data a resumed run sees next is the same whatever Lightning's
# mid-epoch resume does with a plain DataLoader (it restarts the epoch), so any difference left
# comes from the callbacks' own state.
STEPS_PER_EPOCH = 1
TOTAL_STEPS = 12
STOP_AT = 4


def gmp() -> list:
    return [MagnitudePruning(final_sparsity=0.75, start_step=0, end_step=7, frequency=1, include=[ENCODER])]


def nm_with_qat() -> list:
    return [NMSparsity(prune_step=2, backend="native", include=[ENCODER]), QuantizationAwareTraining(start_step=5)]


class StopAt(pl.Callback):
    """Ends fit after ``step`` optimizer steps, as a preempted job would, keeping max_steps (and the LR schedule)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def run(tmp_path: Path, make_callbacks, stop_at: int | None = None, ckpt_path: Path | None = None):
    callbacks, module = make_callbacks(), tiny_module()
    trainer = make_trainer(tmp_path, callbacks + ([StopAt(stop_at)] if stop_at else []), TOTAL_STEPS)
    trainer.fit(module, train_dataloaders=batches(4 * STEPS_PER_EPOCH), ckpt_path=ckpt_path)
    return trainer, module, callbacks


@pytest.mark.slow
@pytest.mark.parametrize("make_callbacks", [gmp, nm_with_qat], ids=["gmp", "nm24+qat"])
def test_resume_matches_an_uninterrupted_run(tmp_path: Path, make_callbacks) -> None:
    _, straight, straight_callbacks = run(tmp_path / "straight", make_callbacks)

    stopped, _, _ = run(tmp_path / "first", make_callbacks, stop_at=STOP_AT)
    checkpoint = tmp_path / "mid.ckpt"
    stopped.save_checkpoint(checkpoint)
    assert stopped.global_step == STOP_AT
    _, resumed, resumed_callbacks = run(tmp_path / "second", make_callbacks, ckpt_path=checkpoint)

    expected, actual = masks_of(straight_callbacks[0]), masks_of(resumed_callbacks[0])
    assert expected and expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    for name, value in straight.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[name]), name
    if make_callbacks is nm_with_qat:
        assert resumed_callbacks[1].active and len(fake_quantized_layers(resumed.student)) == 12


def test_masks_that_do_not_fit_the_model_are_refused(tmp_path: Path) -> None:
    stopped, _, _ = run(tmp_path / "first", gmp, stop_at=STOP_AT)
    stopped_checkpoint = tmp_path / "mid.ckpt"
    stopped.save_checkpoint(stopped_checkpoint)
    checkpoint = torch.load(stopped_checkpoint, weights_only=False)
    (state,) = [value for key, value in checkpoint["callbacks"].items() if "MagnitudePruning" in key]
    name = next(iter(state["masks"]))
    state["masks"][name] = state["masks"][name][:, :4]
    torch.save(checkpoint, stopped_checkpoint)
    with pytest.raises(ValueError, match=rf"checkpoint: the mask for {name} has shape \(\d+, 4\)"):
        run(tmp_path / "second", gmp, ckpt_path=stopped_checkpoint)
