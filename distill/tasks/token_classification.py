"""Token classification (tagging): one prediction per word, scored by accuracy over the tagged words.

Logits are ``(batch, positions, tags)``; a word's tag sits on its first sub-word token and every other
position (later sub-words, special tokens, padding) is -100. That is sequence classification with a label
per position: :class:`~distill.tasks.classification.ClassificationTask` leaves -100 out of the loss, the
metrics and the standalone score, and compares teacher and student position by position as they are.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoModelForTokenClassification

from distill.tasks.classification import ClassificationTask


class TokenClassificationTask(ClassificationTask):
    """Per-word tags from a ``*ForTokenClassification`` model: word accuracy of student and teacher, and
    their agreement; the exported model's config carries the tag names."""

    name = "token_classification"
    auto_model = AutoModelForTokenClassification
    target_unit = "words"

    def __init__(self, label_names: list[str]) -> None:
        super().__init__(len(label_names))
        self.label_names = list(label_names)

    def model_kwargs(self) -> dict[str, Any]:
        names = dict(enumerate(self.label_names))
        return {**super().model_kwargs(), "id2label": names, "label2id": {v: k for k, v in names.items()}}
