"""Tagged sentences for token classification: JSON lines of words and their tags.

Contract:

* ``<data_dir>/<name>/{train,dev}.jsonl``, one sentence per line: ``{"tokens": [...], "tags": [...]}``, a tag
  per word, each one of ``label_names``. Dev is both the validation and the test split (GLUE's convention).
* Words are tokenised as pre-split words; a word's tag goes to its first sub-word token, and every other
  position (later sub-words, special tokens, padding) gets -100, so losses and metrics count words.
* Rows are padded to ``max_length`` tokens (a sentence that does not fit is cut, and its cut words are not
  scored), so a training row is a fixed number of positions: the teacher-logit store keeps one per position.
* Corpora this size are tokenised in memory on every start; a bad file names the line and the field.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
from transformers import AutoTokenizer

from distill.data.base import DataModule, check_max_length
from distill.data.split_loaders import check_batch_sizes
from distill.utils.keys import EXAMPLE_INDEX, digest, tokenizer_fingerprint

IGNORE_INDEX = -100
FILES = {"train": "train.jsonl", "validation": "dev.jsonl"}


def read_tagged(path: Path, label_names: list[str]) -> list[dict[str, list]]:
    """The sentences of one JSON-lines file, tags as class ids; a malformed line raises naming it."""
    sentences = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        tokens, tags = row.get("tokens"), row.get("tags")
        if not isinstance(tokens, list) or not isinstance(tags, list) or len(tokens) != len(tags):
            raise ValueError(f"{path}:{number} needs 'tokens' and 'tags', two lists of equal length")
        unknown = sorted(set(tags) - set(label_names))
        if unknown:
            raise ValueError(f"{path}:{number} has tags {unknown} outside data.label_names={label_names}")
        sentences.append({"tokens": tokens, "tags": [label_names.index(tag) for tag in tags]})
    return sentences


class TaggedDataModule(DataModule):
    """Tokenised, fixed-length rows of tagged sentences.

    Args:
        name: the corpus: its folder under ``data_dir`` and its name in cache keys.
        label_names: the tags, in class-id order.
        tokenizer: the tokenizer both models read with (the teacher's).
        max_length: tokens per row, special tokens included.
    """

    def __init__(
        self,
        name: str,
        label_names: list[str],
        data_dir: str,
        tokenizer: str,
        max_length: int = 64,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.check_settings(label_names, max_length, batch_size, eval_batch_size)
        self.task, self.label_names, self.num_labels = name, list(label_names), len(label_names)
        self.folder = Path(data_dir).expanduser() / name
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.tokenizer_key = tokenizer_fingerprint(self.tokenizer)
        self.max_length, self.batch_size, self.eval_batch_size = max_length, batch_size, eval_batch_size
        self.num_workers, self.seed = num_workers, seed
        self.positions_per_example = max_length
        self.splits: dict[str, datasets.Dataset] = {}

    @staticmethod
    def check_settings(label_names: Sequence[str], max_length: int, batch_size: int, eval_batch_size: int) -> None:
        """The constructor's range checks, which :func:`distill.config.schemas.validate` also runs on ``data``."""
        if len(set(label_names)) != len(label_names) or not label_names:
            raise ValueError(f"label_names={list(label_names)!r} must be distinct tags, at least one")
        if max_length < 2:
            raise ValueError(f"max_length={max_length!r} must be >= 2")
        check_batch_sizes(batch_size, eval_batch_size)

    def prepare_data(self) -> None:
        missing = [str(self.folder / file) for file in FILES.values() if not (self.folder / file).is_file()]
        if missing:
            raise FileNotFoundError(f"no tagged sentences at {', '.join(missing)} (data.data_dir, data.name)")

    def setup(self, stage: str | None = None) -> None:
        if self.splits:  # set up already: every stage shares the splits
            return
        self.prepare_data()
        splits = {split: self._rows(self.folder / file) for split, file in FILES.items()}
        splits["train"] = splits["train"].add_column(EXAMPLE_INDEX, list(range(len(splits["train"]))))
        splits["test"] = splits["validation"]
        self.splits = {split: rows.with_format("torch") for split, rows in splits.items()}

    def _rows(self, path: Path) -> datasets.Dataset:
        sentences = read_tagged(path, self.label_names)
        encoded = self.tokenizer(
            [sentence["tokens"] for sentence in sentences],
            is_split_into_words=True,
            truncation=True,
            padding="max_length",
            max_length=self.max_length,
        )
        labels = [self._word_labels(encoded.word_ids(i), s["tags"]) for i, s in enumerate(sentences)]
        return datasets.Dataset.from_dict(
            {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": labels}
        )

    @staticmethod
    def _word_labels(word_ids: list[int | None], tags: list[int]) -> list[int]:
        """Each word's tag on its first sub-word; -100 on later sub-words, special tokens and padding."""
        labels, previous = [], None
        for word in word_ids:
            labels.append(tags[word] if word is not None and word != previous else IGNORE_INDEX)
            previous = word
        return labels

    def _file_key(self, split: str) -> str:
        return hashlib.sha256((self.folder / FILES[split]).read_bytes()).hexdigest()[:16]

    def train_fingerprint(self) -> str:
        return digest([self.task, self.tokenizer_key, self.max_length, self.label_names, self._file_key("train")])

    def teacher_key_fields(self) -> dict[str, Any]:
        return {"train": self.train_fingerprint(), "validation": self._file_key("validation")}

    def check_context(self, max_positions: int) -> None:
        check_max_length(self.max_length, max_positions)
