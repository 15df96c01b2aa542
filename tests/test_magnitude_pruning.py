"""MagnitudePruning: the Zhu & Gupta schedule, exact and monotone masks, in-place enforcement."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.ao.pruning import CubicSL

from distill.callbacks.magnitude_pruning import MagnitudePruning, gmp_sparsity
from tests.callback_helpers import ENCODER, batches, make_trainer, masks_of, tiny_module


@pytest.mark.parametrize(("start", "end", "frequency", "initial"), [(0, 100, 10, 0.0), (20, 80, 15, 0.1)])
def test_schedule_matches_torch_cubic(start: int, end: int, frequency: int, initial: float) -> None:
    schedule = dict(start_step=start, end_step=end, frequency=frequency, initial=initial, final=0.8)
    assert gmp_sparsity(start - 1, **schedule) == 0.0
    for step in range(start, end + 30):
        last_update = end if step >= end else start + (step - start) // frequency * frequency
        expected = CubicSL.sparsity_compute_fn(initial, 0.8, last_update, start, 1, end - start)
        assert gmp_sparsity(step, **schedule) == pytest.approx(expected, abs=1e-12)
    assert gmp_sparsity(end, **schedule) == pytest.approx(0.8)


class StepWatch(pl.Callback):
    """After every step (ordered after the pruning callback): masks, weights and Adam moments."""

    def __init__(self, pruning: MagnitudePruning) -> None:
        self.pruning = pruning
        self.history: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        for name, mask in self.pruning.masks.items():
            assert not module.get_parameter(name).grad[~mask].any(), f"unmasked gradient in {name}"

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        optimizer = trainer.optimizers[0]
        for name, mask in self.pruning.masks.items():
            param = module.get_parameter(name)
            assert not param[~mask].any(), f"pruned weights came back in {name}"
            state = optimizer.state[param]
            assert not state["exp_avg"][~mask].any() and not state["exp_avg_sq"][~mask].any()
        self.history.append(masks_of(self.pruning))


def fit_pruning(tmp_path: Path, max_steps: int = 8, **options) -> tuple[MagnitudePruning, StepWatch]:
    pruning = MagnitudePruning(**({"final_sparsity": 0.75, "start_step": 0, "end_step": 6, "frequency": 2} | options))
    watch = StepWatch(pruning)
    make_trainer(tmp_path, [pruning, watch], max_steps).fit(tiny_module(), train_dataloaders=batches(16))
    return pruning, watch


def test_layer_masks_are_exact_and_only_grow(tmp_path: Path) -> None:
    pruning, watch = fit_pruning(tmp_path, include=[ENCODER])
    assert len(pruning.targets) == 12  # 6 Linear layers per encoder layer, 2 layers
    for step, masks in enumerate(watch.history):
        sparsity = gmp_sparsity(step, **pruning.schedule)
        for name, mask in masks.items():
            assert int((~mask).sum()) == round(sparsity * mask.numel()), (step, name)
            if step:
                assert not (mask & ~watch.history[step - 1][name]).any(), "a pruned weight grew back"
    assert pruning.sparsity == pytest.approx(0.75)


def test_global_scope_hits_the_total(tmp_path: Path) -> None:
    pruning, _ = fit_pruning(tmp_path, scope="global")
    total = sum(mask.numel() for mask in pruning.masks.values())
    pruned = sum(int((~mask).sum()) for mask in pruning.masks.values())
    assert pruned == round(0.75 * total)
    assert len({round(float((~mask).float().mean()), 3) for mask in pruning.masks.values()}) > 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"final_sparsity": 1.0}, r"final_sparsity=1.0 must be in \[0, 1\)"),
        ({"final_sparsity": -0.1}, r"final_sparsity=-0.1"),
        ({"start_step": 10, "end_step": 5}, "end_step=5 must come after start_step=10"),
        ({"frequency": 0}, "frequency=0"),
        ({"scope": "model"}, "scope='model'"),
        ({"initial_sparsity": 0.9}, "initial_sparsity=0.9 is above final_sparsity=0.8"),
    ],
)
def test_bad_settings_are_named(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MagnitudePruning(**({"final_sparsity": 0.8, "start_step": 0, "end_step": 10} | options))


def test_a_pattern_matching_nothing_is_named(tmp_path: Path) -> None:
    pruning = MagnitudePruning(final_sparsity=0.5, start_step=0, end_step=2, include=["student.decoder.*"])
    with pytest.raises(ValueError, match=r"'student.decoder.\*' matches no Linear layer"):
        make_trainer(tmp_path, [pruning], 2).fit(tiny_module(), train_dataloaders=batches())
