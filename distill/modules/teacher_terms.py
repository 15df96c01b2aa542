"""The loss terms of a training step that read the teacher's side: the store's targets for the batch, the
task's fused loss where it has one, else the student's and teacher's outputs through the loss family, with
the perturbed copies' KD and the hidden-state term. A part of :class:`distill.modules.distillation.
DistillationModule`, kept here so that the module's file reads as its hooks."""

from __future__ import annotations

from torch import Tensor

from distill.losses.kd import KDLossTerms
from distill.losses.topk import TopKTargets
from distill.tasks.base import FusedStep
from distill.utils.sharding import is_sharded


class TeacherTerms:
    """Mixed into the LightningModule, whose student, teacher, store, losses and task these methods read."""

    def _stored_targets(self, example_index: Tensor | None) -> Tensor | TopKTargets | None:
        """The store's teacher targets for the batch; ``None`` without a store or for the student's own samples."""
        if self.teacher_logits is None or example_index is None:
            return None
        return self.teacher_logits(example_index)

    def _fused_terms(
        self, batch: dict[str, Tensor], labels: Tensor, stored: Tensor | TopKTargets | None
    ) -> KDLossTerms | None:
        """The task's fused loss, where it has one. The fused kernels read the output heads' weights outside a
        forward, where FSDP holds only shards, and compute no hidden-state term."""
        if self.hidden_loss is not None or is_sharded(self.student):
            return None
        settings = self.loss
        step = FusedStep(self.student, self.teacher, stored, settings.temperature, settings.alpha, settings.divergence)
        return self.task.fused_terms(step, batch, labels)

    def _loss_terms(
        self,
        batch: dict[str, Tensor],
        labels: Tensor,
        stored: Tensor | TopKTargets | None,
        uses_teacher: bool,
        example_index: Tensor | None,
        copies: dict[str, Tensor],
        copy_fingerprint: Tensor | None,
    ) -> KDLossTerms:
        with_hidden = uses_teacher and self.hidden_loss is not None
        student_out = self.student(**batch, output_hidden_states=with_hidden)
        teacher_logits, teacher_hidden = (
            self._teacher_outputs(batch, stored, with_hidden) if uses_teacher else (None, None)
        )
        terms = self.loss(*self.task.align(student_out.logits, teacher_logits, labels))
        loss, kd, size = terms.loss, terms.kd, labels.shape[0]
        if uses_teacher and copies:
            # The KL is averaged over the whole transfer set: the examples and their perturbed copies.
            copies_size = copies["input_ids"].shape[0]
            copies_kd = self._copies_kd(copies, example_index, copy_fingerprint)
            kd = (size * kd + copies_size * copies_kd) / (size + copies_size)
            loss = self.loss.alpha * terms.ce + (1 - self.loss.alpha) * kd
        if with_hidden:
            hidden = self.hidden_loss(student_out.hidden_states, teacher_hidden, batch["attention_mask"])
            loss = loss + (1 - self.loss.alpha) * self.hparams.hidden_weight * hidden
            self.log("train/loss_hidden", hidden, batch_size=size)
        return KDLossTerms(loss=loss, ce=terms.ce, kd=kd)

    def _copies_kd(self, copies: dict[str, Tensor], example_index: Tensor | None, fingerprint: Tensor | None) -> Tensor:
        """T^2 * D on the unlabelled perturbed copies (:mod:`distill.data.augment`)."""
        epoch, step = self.current_epoch, self.global_step
        teacher_targets = self.copy_targets(self.teacher, copies, epoch, step, example_index, fingerprint)
        return self.loss.soft(self.student(**copies).logits, teacher_targets)

    def _teacher_outputs(
        self, batch: dict[str, Tensor], stored: Tensor | TopKTargets | None, with_hidden: bool
    ) -> tuple[Tensor | TopKTargets, tuple[Tensor, ...] | None]:
        """Teacher logits (the store's when it has the batch) and hidden states if asked."""
        if stored is not None:
            return stored, None
        out = self.teacher(batch, output_hidden_states=with_hidden)
        return out.logits, out.hidden_states
