"""DistillationModule: a trainable student learning from a frozen teacher.

The teacher lives outside the module tree (in :class:`FrozenTeacher`), so it is never in
``parameters()``, the optimizer, ``state_dict``/checkpoints or saved hyperparameters, and
Lightning's ``train()`` calls cannot switch its dropout back on. With ``teacher=None`` and
``alpha=1`` the module is plain cross-entropy fine-tuning (used for the teacher stage).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard
from transformers import PreTrainedModel

from distill.losses.hidden import HiddenStateLoss
from distill.losses.kd import KDLoss, KDLossTerms, check_kd_args
from distill.losses.topk import TopKTargets
from distill.modules.copy_targets import CopyTargets
from distill.modules.frozen_teacher import FrozenTeacher
from distill.modules.loss_guard import NonFiniteLossGuard
from distill.modules.on_policy import OnPolicy
from distill.modules.optimization import optimizer_with_schedule
from distill.modules.step_mean import StepMean
from distill.modules.student_checkpoint import describe_student, load_student, set_asp_masks_aside
from distill.tasks import ClassificationTask
from distill.tasks.base import FusedStep, Task
from distill.utils.keys import COPY_FINGERPRINT, EXAMPLE_INDEX, pop_copies
from distill.utils.sharding import is_sharded, shard


class DistillationModule(pl.LightningModule):
    """Trains ``student`` on ``alpha * CE + (1 - alpha) * (T^2 * KL + hidden_weight * hidden)``.

    Args:
        student: a trainable Hugging Face model of the task's kind.
        teacher: the frozen teacher, or ``None`` for plain fine-tuning (requires ``alpha=1``).
        num_labels: number of classes of the default task (sequence classification).
        temperature, alpha: the KD loss settings (see :mod:`distill.losses.kd`).
        divergence, beta: the member of the divergence family the soft term uses, and its weight.
        optimizer: a partial optimizer taking ``params`` (Hydra ``_partial_: true``).
        warmup_ratio: fraction of the training steps with linear warm-up, then linear decay to 0.
        hidden_weight: weight of the hidden-state term (:mod:`distill.losses.hidden`); 0 turns it off.
            Like the KD term it is scaled by ``1 - alpha``, so ``alpha=1`` learns from labels only.
        hidden_layers: the teacher layer each student layer matches; ``None`` spreads them uniformly.
        teacher_logits: precomputed teacher logits by training-example index
            (:class:`distill.stores.teacher_logits.TeacherLogitStore`), with those on the perturbed copies in
            its ``copies``; the teacher then runs for evaluation and for copies the store lacks.
        task: what differs per task (:mod:`distill.tasks`); ``None`` is classification with ``num_labels``.
        teacher_memo: a file that keeps the teacher's evaluation answers across runs (see :class:`FrozenTeacher`).
        on_policy: resamples some steps' responses from the student (:class:`~distill.modules.on_policy.OnPolicy`);
            the live teacher grades them, whatever store the run has.
    """

    def __init__(
        self,
        student: PreTrainedModel,
        teacher: nn.Module | None,
        num_labels: int | None,
        temperature: float,
        alpha: float,
        optimizer: Callable[..., torch.optim.Optimizer],
        warmup_ratio: float = 0.06,
        hidden_weight: float = 0.0,
        hidden_layers: list[int] | None = None,
        teacher_logits: Callable[[Tensor], Tensor] | None = None,
        divergence: str = "forward_kl",
        beta: float = 0.5,
        task: Task | None = None,
        teacher_memo: str | None = None,
        on_policy: OnPolicy | None = None,
    ) -> None:
        super().__init__()
        self.check_settings(temperature, alpha, divergence, beta, warmup_ratio, hidden_weight)
        if teacher is None and teacher_logits is None and alpha != 1:
            raise ValueError(f"alpha={alpha!r} needs a teacher or its stored targets; without, only alpha=1 works")
        ignored = ["student", "teacher", "optimizer", "teacher_logits", "task", "teacher_memo", "on_policy"]
        self.save_hyperparameters(ignore=ignored)
        self.task = task if task is not None else ClassificationTask(num_labels)
        self.student = student
        self.teacher = FrozenTeacher(teacher, teacher_memo) if teacher is not None else None
        self.loss = KDLoss(temperature=temperature, alpha=alpha, divergence=divergence, beta=beta)
        self.hidden_loss = HiddenStateLoss.between(student, teacher, hidden_layers) if hidden_weight > 0 else None
        if teacher_logits is not None and self.hidden_loss is not None:
            raise ValueError("precomputed teacher logits hold no hidden states: set distill.hidden_weight=0")
        self.teacher_logits = teacher_logits
        self.on_policy = on_policy
        self.copy_targets = CopyTargets(getattr(teacher_logits, "copies", None))
        self.step_mean = StepMean()
        self.loss_guard = NonFiniteLossGuard()
        # Examples or tokens (task.target_unit) this rank trained on, resumes included: an int, or a
        # device tensor once a step has added its count (read through `trained_targets`).
        self._trained_targets: Tensor | int = 0
        self.optimizer_factory = optimizer
        self.metrics = self.task.make_metrics()

    @staticmethod
    def check_settings(
        temperature: float, alpha: float, divergence: str, beta: float, warmup_ratio: float, hidden_weight: float
    ) -> None:
        """The range checks of the module's settings, which :func:`distill.config.schemas.validate` also runs on
        ``distill`` before any stage."""
        check_kd_args(temperature, alpha, divergence, beta)
        if not 0.0 <= warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio={warmup_ratio!r} is outside [0.0, 1.0]")
        if hidden_weight < 0:
            raise ValueError(f"hidden_weight={hidden_weight!r} must be >= 0")

    def configure_model(self) -> None:
        """Under ``trainer=fsdp`` (Lightning's ModelParallelStrategy hands over a device mesh): shard the
        student, the hidden-state projections and the frozen teacher over the data-parallel ranks."""
        if self.device_mesh is None or is_sharded(self.student):
            return
        mesh = self.device_mesh["data_parallel"]
        shard(self.student, mesh)
        if self.hidden_loss is not None:
            fully_shard(self.hidden_loss, mesh=mesh)
        if self.teacher is not None:
            self.teacher.shard(mesh)
        rank_zero_info(
            f"FSDP: the student{' and the teacher' if self.teacher else ''} sharded over {mesh.size()} ranks"
        )

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        return self.student(**inputs).logits

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        labels = batch.pop("labels")
        example_index = batch.pop(EXAMPLE_INDEX, None)
        copy_fingerprint = batch.pop(COPY_FINGERPRINT, None)
        copies = pop_copies(batch)
        if self.on_policy is not None and self.on_policy.draws(self.global_step):
            batch, labels = self.on_policy.resample(self.student, batch, labels)
            example_index = None  # no stored targets for the student's own samples: the live teacher's
        # With alpha=1 every teacher term has weight 0: skip the teacher (and the unlabelled copies). A served
        # teacher has no model here: its store holds every training row's targets.
        uses_teacher = (self.teacher is not None or self.teacher_logits is not None) and self.loss.alpha < 1
        stored = self._stored_targets(example_index) if uses_teacher else None
        terms = self._fused_terms(batch, labels, stored) if uses_teacher and not copies else None
        if terms is None:
            terms = self._loss_terms(batch, labels, stored, uses_teacher, example_index, copies, copy_fingerprint)
        counted = self.task.count_targets(labels)
        self.loss_guard.record(terms.loss, self.global_step)
        size = labels.shape[0]
        self._trained_targets = self._trained_targets + counted
        self.log("train/loss", terms.loss, prog_bar=True, batch_size=size)
        if terms.kd is not None:  # the fused kernels return the total only
            self.log("train/loss_kd", terms.kd, batch_size=size)
            self.log("train/loss_ce", terms.ce, batch_size=size)
        return terms.loss * self.step_mean.weight(self._trainer, counted)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        every = self.trainer.log_every_n_steps
        if every > 0 and (batch_idx + 1) % every == 0:  # the loggers read the step's metrics here anyway
            self.loss_guard.raise_if_seen(self.all_gather)

    def on_train_epoch_end(self) -> None:
        self.loss_guard.raise_if_seen(self.all_gather)

    def on_train_end(self) -> None:
        if self.teacher is not None:
            self.teacher.read_back()  # the test and the export after fit find the teacher whole
        self.loss_guard.raise_if_seen(self.all_gather)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.step_mean.rescale(self._trainer, self.student.parameters(), self.device)

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

    def update_metric(self, name: str, batch_size: int, *values: Tensor) -> None:
        """Update the metric ``name`` (``<stage>/<metric>``) with ``values`` and log it for the epoch."""
        metric = self.metrics[name.replace("/", "_")]
        metric(*values)
        self.log(name, metric, prog_bar=name == self.task.monitor, batch_size=batch_size)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.task.evaluate(self, batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.task.evaluate(self, batch, "test")

    def on_train_start(self) -> None:
        self._release_idle_teacher()

    def on_validation_end(self) -> None:
        if self.teacher is not None and self.trainer.is_global_zero:
            self.teacher.save_memo()
        if self.trainer.state.fn == TrainerFn.FITTING:
            self._release_idle_teacher()  # a validation whose answers the memo lacked read it back

    def _release_idle_teacher(self) -> None:
        """Training that takes every target from the store (or has no teacher term) never calls the teacher:
        its weights leave memory for the fit (:meth:`FrozenTeacher.release`)."""
        stored_only = self.teacher_logits is not None and self.hidden_loss is None and self.on_policy is None
        if self.teacher is not None and (stored_only or self.loss.alpha == 1):
            self.teacher.release()

    def on_test_end(self) -> None:
        self.on_validation_end()

    def configure_optimizers(self) -> dict[str, Any]:
        trainable = list(self.student.named_parameters())
        if self.hidden_loss is not None:
            trainable += list(self.hidden_loss.named_parameters())
        total = int(self.trainer.estimated_stepping_batches)
        unscaled = str(self.trainer.precision).endswith("-true")  # no mixed-precision plugin unscaling gradients
        return optimizer_with_schedule(
            self.optimizer_factory, trainable, self.hparams.warmup_ratio, total, may_fuse=unscaled
        )

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

    @staticmethod
    def load_student(checkpoint_path: str) -> PreTrainedModel:
        """Rebuild the student from a Lightning checkpoint of this module, without the teacher."""
        return load_student(checkpoint_path)
