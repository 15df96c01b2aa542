"""Sequence classification: one prediction per example, scored by accuracy.

Labels of -100 are not scored (neither in the loss nor in the metrics), so the same task serves classifiers
with one label per position (:mod:`distill.tasks.token_classification`), whose padding and later sub-words
carry -100.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from transformers import AutoModelForSequenceClassification

from distill.data.base import DataModule
from distill.serve.onnx_int8 import export_onnx
from distill.tasks.base import EvaluatedModule, FusedStep
from distill.utils.devices import model_device, to_device
from distill.utils.keys import EXAMPLE_INDEX

IGNORE_INDEX = -100


@torch.inference_mode()
def accuracy(model: nn.Module, datamodule: DataModule) -> float:
    """Dev-set accuracy of a standalone classifier, over the labels that are not -100."""
    correct = total = 0
    device = model_device(model)
    for batch in datamodule.val_dataloader():
        labels = batch.pop("labels").to(device)
        scored = labels != IGNORE_INDEX
        predictions = model(**to_device(batch, device)).logits.argmax(dim=-1)
        correct += int(((predictions == labels) & scored).sum())
        total += int(scored.sum())
    return correct / total


class ClassificationTask:
    """Logits ``(batch, classes)``; accuracy of the student and the teacher, and their agreement."""

    name = "classification"
    auto_model = AutoModelForSequenceClassification
    monitor, monitor_mode = "val/acc", "max"
    # Batch sizes the exported int8 student's CPU latency is measured at.
    generates = False
    latency_batch_sizes = (1, 32)
    target_unit = "examples"

    def __init__(self, num_labels: int) -> None:
        self.num_labels = num_labels
        # Logits are classes: how teacher and student pad their input vocabularies does not matter.
        self.vocabulary: int | None = None

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_labels": self.num_labels}

    def align(self, student_logits: Tensor, teacher_targets: Any, labels: Tensor) -> tuple[Tensor, Any, Tensor]:
        return student_logits, teacher_targets, labels

    def count_targets(self, labels: Tensor) -> Tensor:
        """Examples that count in a training batch (0-dim, on the labels' device: no host read)."""
        return (labels != IGNORE_INDEX).sum()

    def fused_terms(self, step: FusedStep, batch: dict[str, Tensor], labels: Tensor) -> None:
        return None  # a classifier's logits are small: nothing to fuse

    def make_metrics(self) -> nn.ModuleDict:
        return nn.ModuleDict(
            {
                f"{stage}_{name}": MulticlassAccuracy(
                    num_classes=self.num_labels, average="micro", ignore_index=IGNORE_INDEX
                )
                for stage in ("val", "test")
                for name in ("acc", "teacher_acc", "agreement")
            }
        )

    def evaluate(self, module: EvaluatedModule, batch: dict[str, Tensor], stage: str) -> None:
        labels = batch.pop("labels")
        predictions = module(batch).argmax(dim=-1)
        module.update_metric(f"{stage}/acc", labels.shape[0], predictions, labels)
        if module.teacher is not None:
            teacher_predictions = module.teacher.predictions(batch)
            module.update_metric(f"{stage}/teacher_acc", labels.shape[0], teacher_predictions, labels)
            # Agreement where the labels are scored: the teacher's predictions stand in as labels there.
            agreed = teacher_predictions.masked_fill(labels == IGNORE_INDEX, IGNORE_INDEX)
            module.update_metric(f"{stage}/agreement", labels.shape[0], predictions, agreed)

    def score(self, model: nn.Module, datamodule: DataModule) -> dict[str, float]:
        """Dev accuracy of a standalone model (e.g. the exported int8 student)."""
        return {"val_acc": accuracy(model, datamodule)}

    def export_onnx(self, model: nn.Module, datamodule: DataModule, path: Path) -> None:
        """The logits graph, traced on a few real dev sentences."""
        batch = next(iter(datamodule.dataloader("validation", 4, shuffle=False)))
        export_onnx(
            model, {name: value for name, value in batch.items() if name not in ("labels", EXAMPLE_INDEX)}, path
        )

    def export_extras(
        self, student: nn.Module, teacher: nn.Module | None, datamodule: DataModule, output_dir: Path
    ) -> dict[str, float]:
        return {}  # the run folder's student, int8 export and metrics say all a classifier needs

    def summary(self, results: dict[str, float]) -> dict[str, Any]:
        return {
            "teacher/val_acc": results.get("test/teacher_acc"),
            "student/val_acc": results["test/acc"],
            "student/agreement": results.get("test/agreement"),
        }
