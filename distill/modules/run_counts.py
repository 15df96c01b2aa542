"""What a checkpoint carries beside the weights: the examples or tokens trained on (summed over ranks), the
step-mean reference and the on-policy counts, and the student's description; restored on resume. A part of
:class:`distill.modules.distillation.DistillationModule`."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.trainer.states import TrainerFn

from distill.modules.student_checkpoint import describe_student, set_asp_masks_aside


class RunCounts:
    """Mixed into the LightningModule (its ``_trained_targets``, ``step_mean``, ``on_policy``, ``loss_guard``)."""

    @property
    def trained_targets(self) -> int:
        """Examples or tokens this rank trained on, resumes included (reading it waits for the device)."""
        return int(self._trained_targets)

    @trained_targets.setter
    def trained_targets(self, count: int) -> None:
        self._trained_targets = count

    def trained_targets_all_ranks(self) -> int:
        """Examples or tokens trained on, summed over data-parallel ranks (collective: every rank calls it)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return self.trained_targets
        return int(self.trainer.strategy.reduce(torch.tensor(self.trained_targets), reduce_op="sum"))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.loss_guard.raise_if_seen(self.all_gather)  # before the weights of a bad step are written
        # The count of every rank (each rank's own differ; every rank saves, so the collective pairs up): a resumed
        # rank 0 goes on from the total and the others from zero, which sums to the same whatever the world size.
        checkpoint["trained_targets"] = self.trained_targets_all_ranks()
        checkpoint["step_mean"] = self.step_mean.state_dict()
        if self.on_policy is not None:
            checkpoint["on_policy"] = self.on_policy.state_dict()
        describe_student(checkpoint, self.student)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Resuming fit continues the count; testing a best checkpoint keeps the count of the whole fit.
        if self._trainer is None or self.trainer.state.fn == TrainerFn.FITTING:
            self.trained_targets = checkpoint.get("trained_targets", 0) if self.global_rank == 0 else 0
            self.resume_counts(checkpoint)
        set_asp_masks_aside(checkpoint)

    def resume_counts(self, checkpoint: dict[str, Any]) -> None:
        """The step-mean reference and the on-policy counts of a checkpoint (older ones have neither)."""
        if "step_mean" in checkpoint:
            self.step_mean.load_state_dict(checkpoint["step_mean"])
        if self.on_policy is not None and "on_policy" in checkpoint:
            self.on_policy.load_state_dict(checkpoint["on_policy"])
