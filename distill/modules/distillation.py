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
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    get_linear_schedule_with_warmup,
)

from distill.losses import KDLoss

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


class FrozenTeacher:
    """Wraps the teacher: eval mode, no grad, follows the device of its inputs."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, inputs: dict[str, Tensor]) -> Tensor:
        device = next(iter(inputs.values())).device
        if next(self.model.parameters()).device != device:
            self.model.to(device)
        return self.model(**inputs).logits


class DistillationModule(pl.LightningModule):
    """Trains ``student`` on ``alpha * CE + (1 - alpha) * T^2 * KL`` against ``teacher``.

    Args:
        student: a Hugging Face sequence-classification model (trainable).
        teacher: the frozen teacher, or ``None`` for plain fine-tuning (requires ``alpha=1``).
        num_labels: number of classes, for the accuracy metrics.
        temperature, alpha: the KD loss settings (see :mod:`distill.losses`).
        optimizer: a partial optimizer taking ``params`` (Hydra ``_partial_: true``).
        warmup_ratio: fraction of the training steps with linear warm-up, then linear decay to 0.
    """

    def __init__(
        self,
        student: PreTrainedModel,
        teacher: nn.Module | None,
        num_labels: int,
        temperature: float,
        alpha: float,
        optimizer: Callable[..., torch.optim.Optimizer],
        warmup_ratio: float = 0.06,
    ) -> None:
        super().__init__()
        if teacher is None and alpha != 1:
            raise ValueError(f"alpha={alpha!r} needs a teacher; without one only alpha=1 (fine-tuning) works")
        self.save_hyperparameters(ignore=["student", "teacher", "optimizer"])
        self.student = student
        self.teacher = FrozenTeacher(teacher) if teacher is not None else None
        self.loss = KDLoss(temperature=temperature, alpha=alpha)
        self.optimizer_factory = optimizer
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_{name}": MulticlassAccuracy(num_classes=num_labels, average="micro")
                for stage in ("val", "test")
                for name in ("acc", "teacher_acc", "agreement")
            }
        )

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        return self.student(**inputs).logits

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        labels = batch.pop("labels")
        student_logits = self(batch)
        # With alpha=1 the KD term has weight 0: skip the teacher's forward pass entirely.
        teacher_logits = self.teacher(batch) if self.teacher is not None and self.loss.alpha < 1 else None
        terms = self.loss(student_logits, teacher_logits, labels)
        size = labels.shape[0]
        self.log("train/loss", terms.loss, prog_bar=True, batch_size=size)
        self.log("train/loss_kd", terms.kd, batch_size=size)
        self.log("train/loss_ce", terms.ce, batch_size=size)
        return terms.loss

    def _evaluate(self, batch: dict[str, Tensor], stage: str) -> None:
        labels = batch.pop("labels")
        predictions = self(batch).argmax(dim=-1)
        self._update(f"{stage}/acc", predictions, labels)
        if self.teacher is not None:
            teacher_predictions = self.teacher(batch).argmax(dim=-1)
            self._update(f"{stage}/teacher_acc", teacher_predictions, labels)
            self._update(f"{stage}/agreement", predictions, teacher_predictions)

    def _update(self, name: str, predictions: Tensor, targets: Tensor) -> None:
        metric = self.metrics[name.replace("/", "_")]
        metric(predictions, targets)
        self.log(name, metric, prog_bar=name.endswith("/acc"), batch_size=targets.shape[0])

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for name, param in self.student.named_parameters():
            if param.requires_grad:
                (no_decay if name.endswith(NO_DECAY) else decay).append(param)
        optimizer = self.optimizer_factory(params=[{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(self.hparams.warmup_ratio * total)
        scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The checkpoint describes its own student, so it loads without config files or the teacher.
        checkpoint["student_config"] = self.student.config.to_dict()

    @staticmethod
    def load_student(checkpoint_path: str) -> PreTrainedModel:
        """Rebuild the student from a Lightning checkpoint of this module, without the teacher."""
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        student_config = dict(checkpoint["student_config"])
        config = AutoConfig.for_model(student_config.pop("model_type"), **student_config)
        student = AutoModelForSequenceClassification.from_config(config)
        prefix = "student."
        weights = {
            key[len(prefix) :]: value for key, value in checkpoint["state_dict"].items() if key.startswith(prefix)
        }
        student.load_state_dict(weights)
        return student.eval()
