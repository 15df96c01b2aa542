"""Token classification (tagging): one prediction per word, scored by accuracy over the tagged words.

Logits are ``(batch, positions, tags)``; a word's tag sits on its first sub-word token and every other
position (later sub-words, special tokens, padding) is -100, so the KD and CE terms and the metrics count
exactly the tagged words. Teacher and student are compared position by position, as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from transformers import AutoModelForTokenClassification

from distill.data.base import DataModule
from distill.serve.onnx_int8 import export_onnx
from distill.tasks.base import EvaluatedModule, FusedStep
from distill.utils.devices import model_device, to_device
from distill.utils.keys import EXAMPLE_INDEX

IGNORE_INDEX = -100


@torch.inference_mode()
def word_accuracy(model: nn.Module, datamodule: DataModule) -> float:
    """Accuracy of a standalone tagger over the tagged words of the validation split."""
    metric = MulticlassAccuracy(num_classes=datamodule.num_labels, average="micro", ignore_index=IGNORE_INDEX)
    device = model_device(model)
    for batch in datamodule.val_dataloader():
        labels = batch.pop("labels")
        metric.update(model(**to_device(batch, device)).logits.argmax(dim=-1).cpu(), labels)
    return float(metric.compute())


class TokenClassificationTask:
    """Per-word tags from a ``*ForTokenClassification`` model: word accuracy of student and teacher, and
    their agreement."""

    name = "token_classification"
    auto_model = AutoModelForTokenClassification
    monitor, monitor_mode = "val/acc", "max"
    target_unit = "words"
    generates = False
    latency_batch_sizes = (1, 32)

    def __init__(self, label_names: list[str]) -> None:
        self.label_names = list(label_names)
        self.num_labels = len(self.label_names)
        self.vocabulary: int | None = None  # logits are tags: the input vocabularies' padding does not matter

    def model_kwargs(self) -> dict[str, Any]:
        """The tag count, and the tag names that the exported model's config carries."""
        names = dict(enumerate(self.label_names))
        return {"num_labels": self.num_labels, "id2label": names, "label2id": {v: k for k, v in names.items()}}

    def align(self, student_logits: Tensor, teacher_targets: Any, labels: Tensor) -> tuple[Tensor, Any, Tensor]:
        return student_logits, teacher_targets, labels

    def count_targets(self, labels: Tensor) -> Tensor:
        return (labels != IGNORE_INDEX).sum()

    def fused_terms(self, step: FusedStep, batch: dict[str, Tensor], labels: Tensor) -> None:
        return None  # a tagger's logits are small: nothing to fuse

    def make_metrics(self) -> nn.ModuleDict:
        def accuracy() -> MulticlassAccuracy:
            return MulticlassAccuracy(num_classes=self.num_labels, average="micro", ignore_index=IGNORE_INDEX)

        names = ("acc", "teacher_acc", "agreement")
        return nn.ModuleDict({f"{stage}_{name}": accuracy() for stage in ("val", "test") for name in names})

    def evaluate(self, module: EvaluatedModule, batch: dict[str, Tensor], stage: str) -> None:
        labels = batch.pop("labels")
        words = int((labels != IGNORE_INDEX).sum())
        predictions = module(batch).argmax(dim=-1)
        module.update_metric(f"{stage}/acc", words, predictions, labels)
        if module.teacher is not None:
            teacher_predictions = module.teacher.predictions(batch)
            module.update_metric(f"{stage}/teacher_acc", words, teacher_predictions, labels)
            # Agreement on the tagged words only: the teacher's predictions, masked where the labels are.
            agreed = teacher_predictions.masked_fill(labels == IGNORE_INDEX, IGNORE_INDEX)
            module.update_metric(f"{stage}/agreement", words, predictions, agreed)

    def score(self, model: nn.Module, datamodule: DataModule) -> dict[str, float]:
        return {"val_acc": word_accuracy(model, datamodule)}

    def export_onnx(self, model: nn.Module, datamodule: DataModule, path: Path) -> None:
        """The logits graph, traced on a few real validation sentences."""
        batch = next(iter(datamodule.dataloader("validation", 4, shuffle=False)))
        export_onnx(model, {key: value for key, value in batch.items() if key not in ("labels", EXAMPLE_INDEX)}, path)

    def export_extras(
        self, student: nn.Module, teacher: nn.Module | None, datamodule: DataModule, output_dir: Path
    ) -> dict[str, float]:
        return {}  # the run folder's student, int8 export and metrics say all a tagger needs

    def summary(self, results: dict[str, float]) -> dict[str, Any]:
        return {
            "teacher/val_acc": results.get("test/teacher_acc"),
            "student/val_acc": results["test/acc"],
            "student/agreement": results.get("test/agreement"),
        }
