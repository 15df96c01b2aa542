"""The optimizer step's loss is the mean over every counted target (token or example) of the step:
all micro-batches of a gradient-accumulation window, on all data-parallel ranks.

A training step's loss is a mean over its own batch's ``n`` counted targets. Lightning divides it
by the accumulation count ``k`` and DDP averages the ranks' gradients, so micro-batches and ranks
with few targets would weigh as much as full ones (the peers' bug with padded or prompt-masked
batches). Here each micro-batch's loss is returned as ``mean * n * W / reference`` (``W`` ranks;
``reference`` a count fixed for the run and equal on every rank), which makes the accumulated,
rank-averaged gradient ``sum(grad S) / (k * reference)`` for ``S`` the summed per-target losses;
before the optimizer step it is multiplied by ``k * reference / N``, ``N`` the step's count over all
ranks: exactly the gradient of ``sum(S) / N``. Gradient clipping and the masking callbacks see the
rescaled gradient. One process without accumulation changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

import lightning.pytorch as pl
import torch
from torch import nn


class StepMean:
    def __init__(self) -> None:
        # Device tensors, so that no training step waits to read a count on the host.
        self.reference: torch.Tensor | None = None
        self.counted: torch.Tensor | int = 0

    @staticmethod
    def _active(trainer: pl.Trainer | None) -> bool:
        return trainer is not None and (trainer.world_size > 1 or trainer.accumulate_grad_batches > 1)

    def weight(self, trainer: pl.Trainer | None, counted: torch.Tensor) -> torch.Tensor | float:
        """The factor this micro-batch's mean loss is multiplied by before backward (``counted``: its
        0-dim count on the loss's device)."""
        if not self._active(trainer):
            return 1.0
        if self.reference is None:  # the same on every rank: the largest first micro-batch
            self.reference = trainer.strategy.reduce(counted.float().clamp(min=1), reduce_op="max")
        self.counted = self.counted + counted
        return counted * trainer.world_size / self.reference

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        """The run's reference count: a resumed run scales by the same number, so its steps match bit for bit."""
        return {"reference": None if self.reference is None else self.reference.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor | None]) -> None:
        self.reference = state["reference"]

    def rescale(self, trainer: pl.Trainer | None, parameters: Iterable[nn.Parameter], device: torch.device) -> None:
        """Turn the accumulated gradients into those of the step's mean; call once before each step."""
        if not self._active(trainer) or self.reference is None:
            return
        counted = torch.as_tensor(self.counted, dtype=torch.float32, device=device)
        total = trainer.strategy.reduce(counted, reduce_op="sum")
        factor = trainer.accumulate_grad_batches * self.reference / total.clamp(min=1)
        self.counted = 0
        for parameter in parameters:
            if parameter.grad is not None:
                parameter.grad.mul_(factor)
