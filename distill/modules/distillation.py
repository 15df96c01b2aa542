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
from distill.losses.kd import KDLoss, check_kd_args
from distill.modules.copy_targets import CopyTargets
from distill.modules.frozen_teacher import FrozenTeacher
from distill.modules.loss_guard import NonFiniteLossGuard
from distill.modules.on_policy import OnPolicy
from distill.modules.optimization import optimizer_with_schedule
from distill.modules.run_counts import RunCounts
from distill.modules.step_mean import StepMean
from distill.modules.student_checkpoint import load_student
from distill.modules.teacher_terms import TeacherTerms
from distill.tasks import ClassificationTask
from distill.tasks.base import Task
from distill.utils.keys import COPY_FINGERPRINT, EXAMPLE_INDEX, pop_copies
from distill.utils.sharding import is_sharded, shard


class DistillationModule(TeacherTerms, RunCounts, pl.LightningModule):
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

    @staticmethod
    def load_student(checkpoint_path: str) -> PreTrainedModel:
        """Rebuild the student from a Lightning checkpoint of this module, without the teacher."""
        return load_student(checkpoint_path)
