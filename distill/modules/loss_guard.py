"""Stops a run whose training loss is NaN or infinite, without reading the loss on the host every step.

``if not torch.isfinite(loss)`` in the training step copies the loss to the host: on an accelerator
the CPU then waits for the step's queued kernels every step. :class:`NonFiniteLossGuard` instead
keeps the first bad step and its loss in device tensors, and the host reads them only where it waits
anyway or must: before a checkpoint is written, at logging steps, at the end of a training epoch and
of training. The trade-off: the optimizer may take a few steps on the bad gradients (the weights turn
NaN) before the run stops, but no checkpoint written after the first bad step gets through, so every
saved checkpoint holds good weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

NEVER = -1  # the step recorded while every loss was finite


class NonFiniteLossGuard:
    def __init__(self) -> None:
        # Made on the loss's device by the first record: a host-to-device copy would wait for the device.
        self.first_bad_step: Tensor | None = None
        self.first_bad_loss: Tensor | None = None

    def record(self, loss: Tensor, step: int) -> None:
        """Remember ``step`` and ``loss`` if the loss is not finite and no earlier step's was; no host read."""
        loss = loss.detach().float()
        if self.first_bad_step is None:
            self.first_bad_step = torch.full((), NEVER, dtype=torch.long, device=loss.device)
            self.first_bad_loss = torch.zeros((), device=loss.device)
        first = ~torch.isfinite(loss) & (self.first_bad_step == NEVER)
        self.first_bad_step = torch.where(first, step, self.first_bad_step)
        self.first_bad_loss = torch.where(first, loss, self.first_bad_loss)

    def raise_if_seen(self, all_gather: Callable[[Tensor], Tensor]) -> None:
        """Raise ``FloatingPointError`` naming the earliest bad step of any rank and its loss.

        Reads the device (call it where the host syncs anyway). ``all_gather`` is the module's: every
        rank calls this at the same points and sees every rank's record, so all of them stop together
        (the bad gradients of one rank reach the others' weights through the gradient all-reduce)."""
        recorded = self.first_bad_step is not None  # no step yet: gather "never", as every rank must gather
        steps = all_gather(self.first_bad_step if recorded else torch.tensor(NEVER)).reshape(-1).tolist()
        losses = all_gather(self.first_bad_loss if recorded else torch.tensor(0.0)).reshape(-1).tolist()
        bad = [(step, loss) for step, loss in zip(steps, losses, strict=True) if step != NEVER]
        if bad:
            step, loss = min(bad, key=lambda row: row[0])
            raise FloatingPointError(f"train/loss is {loss} at step {step}; stopping the run")
