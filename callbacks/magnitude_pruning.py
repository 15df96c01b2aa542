"""Gradual magnitude pruning (Zhu & Gupta 2017) as a Lightning callback.

At steps ``start_step, start_step + frequency, ...`` up to ``end_step`` (always included) the
target sparsity is ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (end_step - t0))**3`` and each
targeted weight (``scope="layer"``), or all of them together (``scope="global"``), loses its
smallest-magnitude entries until exactly ``round(s_t * numel)`` are zero. Pruned entries stay
pruned: masks only grow. Steps are ``trainer.global_step`` (optimizer steps), so gradient
accumulation does not change the schedule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from distill.callbacks.masking import MaskingCallback


def gmp_sparsity(step: int, *, start_step: int, end_step: int, frequency: int, initial: float, final: float) -> float:
    """The schedule's sparsity in force at ``step`` (0 before ``start_step``)."""
    if step < start_step:
        return 0.0
    last_update = end_step if step >= end_step else start_step + (step - start_step) // frequency * frequency
    progress = (last_update - start_step) / (end_step - start_step)
    return final + (initial - final) * (1.0 - progress) ** 3


def prune_smallest(scores: Tensor, count: int) -> Tensor:
    """Keep-mask with False at the ``count`` smallest ``scores`` (exact count, via ``topk``)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if count > 0:
        keep[torch.topk(scores.flatten(), count, largest=False, sorted=False).indices] = False
    return keep.view(scores.shape)


class MagnitudePruning(MaskingCallback):
    """Prune the targeted Linear-like weights gradually to ``final_sparsity`` during fit."""

    def __init__(
        self,
        final_sparsity: float,
        start_step: int,
        end_step: int,
        frequency: int = 100,
        initial_sparsity: float = 0.0,
        scope: str = "layer",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        zero_optimizer_state: bool = True,
        allow_overlap: bool = False,
    ) -> None:
        super().__init__(include, exclude, zero_optimizer_state, allow_overlap)
        for name, value in (("final_sparsity", final_sparsity), ("initial_sparsity", initial_sparsity)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name}={value!r} must be in [0, 1)")
        if initial_sparsity > final_sparsity:
            raise ValueError(f"initial_sparsity={initial_sparsity!r} is above final_sparsity={final_sparsity!r}")
        if start_step < 0 or end_step <= start_step:
            raise ValueError(f"end_step={end_step!r} must come after start_step={start_step!r} (and start >= 0)")
        if frequency < 1:
            raise ValueError(f"frequency={frequency!r} must be >= 1 step")
        if scope not in ("layer", "global"):
            raise ValueError(f"scope={scope!r} must be 'layer' or 'global'")
        self.schedule = dict(
            start_step=start_step,
            end_step=end_step,
            frequency=frequency,
            initial=initial_sparsity,
            final=final_sparsity,
        )
        self.scope = scope
        self.last_update_step = -1
        self.sparsity = 0.0

    def complete(self, global_step: int) -> bool:
        """Whether the final masks are in place: the update at ``end_step`` has been trained through."""
        return global_step > self.schedule["end_step"]

    def is_update_step(self, step: int) -> bool:
        start, end = self.schedule["start_step"], self.schedule["end_step"]
        return step == end or (start <= step < end and (step - start) % self.schedule["frequency"] == 0)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self.last_update_step or not self.is_update_step(step):
            return
        self.sparsity = gmp_sparsity(step, **self.schedule)
        self.set_masks(trainer, pl_module, self.compute_masks(pl_module, self.sparsity))
        self.last_update_step = step

    @torch.no_grad()
    def compute_masks(self, pl_module: pl.LightningModule, sparsity: float) -> dict[str, Tensor]:
        scores = {}
        for name in self.targets:
            score = pl_module.get_parameter(name).detach().float().abs()
            if name in self.masks:  # already pruned entries rank below every live weight: masks only grow
                score = score.masked_fill(~self.masks[name].to(score.device), -1.0)
            scores[name] = score
        if self.scope == "layer":
            return {name: prune_smallest(score, round(sparsity * score.numel())) for name, score in scores.items()}
        flat = torch.cat([score.flatten() for score in scores.values()])
        keep = prune_smallest(flat, round(sparsity * flat.numel())).split([s.numel() for s in scores.values()])
        return {name: part.view(score.shape) for (name, score), part in zip(scores.items(), keep, strict=True)}

    def describe(self) -> dict[str, Any]:
        """For the export manifest."""
        return {"layers": sorted(self.masks), "sparsity": self.sparsity, "scope": self.scope, **self.schedule}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "last_update_step": self.last_update_step, "sparsity": self.sparsity}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.last_update_step = state_dict["last_update_step"]
        self.sparsity = state_dict["sparsity"]
