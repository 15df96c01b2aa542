"""Sequence classification: one prediction per example, scored by accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from transformers import AutoModelForSequenceClassification

from distill.data.glue import EXAMPLE_INDEX
from distill.serve.onnx_int8 import export_onnx


class ClassificationTask:
    """Logits ``(batch, classes)``; accuracy of the student and the teacher, and their agreement."""

    name = "classification"
    auto_model = AutoModelForSequenceClassification
    monitor, monitor_mode = "val/acc", "max"
    # Batch sizes the exported int8 student's CPU latency is measured at.
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
        return (labels != -100).sum()

    def fused_terms(self, module: Any, batch: dict[str, Tensor], labels: Tensor, example_index: Tensor | None) -> None:
        return None

    def make_metrics(self) -> nn.ModuleDict:
        return nn.ModuleDict(
            {
                f"{stage}_{name}": MulticlassAccuracy(num_classes=self.num_labels, average="micro")
                for stage in ("val", "test")
                for name in ("acc", "teacher_acc", "agreement")
            }
        )

    def evaluate(self, module: Any, batch: dict[str, Tensor], stage: str) -> None:
        labels = batch.pop("labels")
        predictions = module(batch).argmax(dim=-1)
        module.update_metric(f"{stage}/acc", labels.shape[0], predictions, labels)
        if module.teacher is not None:
            teacher_predictions = module.teacher.predictions(batch)
            module.update_metric(f"{stage}/teacher_acc", labels.shape[0], teacher_predictions, labels)
            module.update_metric(f"{stage}/agreement", labels.shape[0], predictions, teacher_predictions)

    def score(self, model: nn.Module, datamodule: Any) -> dict[str, float]:
        """Dev accuracy of a standalone model (e.g. the exported int8 student)."""
        from distill.eval import accuracy

        return {"val_acc": accuracy(model, datamodule)}

    def export_onnx(self, model: nn.Module, datamodule: Any, path: Path) -> None:
        """The logits graph, traced on a few real dev sentences."""
        batch = next(iter(datamodule.dataloader("validation", 4, shuffle=False)))
        export_onnx(
            model, {name: value for name, value in batch.items() if name not in ("labels", EXAMPLE_INDEX)}, path
        )

    def export_extras(self, student: nn.Module, teacher: nn.Module | None, datamodule: Any, output_dir: Any) -> dict:
        return {}

    def summary(self, results: dict[str, float]) -> dict[str, Any]:
        return {
            "teacher/val_acc": results.get("test/teacher_acc"),
            "student/val_acc": results["test/acc"],
            "student/agreement": results.get("test/agreement"),
        }
