"""The user's own conversations for causal-LM distillation, as a LightningDataModule.

Contract:

* Conversations are rows of local tables (``.jsonl``/``.json``, ``.parquet``) or a hub dataset, each a
  ``messages`` list of ``{role, content}`` (:class:`~distill.data.documents.DocumentSource`, split by whole
  files, so held-out conversations are never trained on).
* A conversation is one row, rendered with the tokenizer's (the teacher's) chat template and right-padded
  or cut to ``max_length`` tokens. Labels are -100 everywhere but on the assistant turns (their content and
  the template's end of turn), so no system or user token counts in any loss or metric: the student learns
  to answer, not to write the user's side. Rows with no assistant token left after the cut are dropped.
* Rows are fixed-length, like the prompt/response rows of sequence-level KD, rather than packed blocks: a
  block boundary would cut turns from the context their masking depends on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from torch.utils.data import DataLoader

from distill.data.base import DataModule, check_max_length
from distill.data.documents import DocumentSource, SplitDocuments
from distill.data.rows import prompt_lengths
from distill.data.split_loaders import check_batch_sizes
from distill.data.text import BLOCK_FEATURES, IGNORE_INDEX, document_separator
from distill.utils.keys import EXAMPLE_INDEX, digest, tokenizer_fingerprint
from distill.utils.references import load_tokenizer

log = logging.getLogger(__name__)


def render(tokenizer: Any, messages: Sequence[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer: Any, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    A turn's span runs from the end of the conversation before it, rendered with the generation prompt (what
    the model sees when it starts to answer), to the end of the conversation through it. Templates that render
    a conversation's start differently from the whole (dates, dropped reasoning) have no such spans: refused.
    """
    text, spans = render(tokenizer, messages), []
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = render(tokenizer, messages[:turn], generation_prompt=True) if turn else ""
        through = render(tokenizer, messages[: turn + 1])
        if not (text.startswith(start) and text.startswith(through) and len(start) <= len(through)):
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path!r}'s chat template renders the start of a conversation unlike"
                " the whole (it changes earlier turns), so its assistant turns cannot be told apart: use a"
                " tokenizer whose template only appends turns (data.tokenizer=...)"
            )
        spans.append((len(start), len(through)))
    return text, spans


def chat_row(tokenizer: Any, messages: Sequence[dict], max_length: int, pad_id: int) -> dict[str, list[int]]:
    """One conversation's padded row: labels on the assistant turns' tokens only."""
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = encoded["input_ids"][:max_length]
    starts = np.array([start for start, _ in encoded["offset_mapping"][: len(ids)]], dtype=np.int64)
    answer = np.zeros(len(ids), dtype=bool)
    for start, end in spans:
        answer |= (starts >= start) & (starts < end)
    padding = max_length - len(ids)
    return {
        "input_ids": ids + [pad_id] * padding,
        "attention_mask": [1] * len(ids) + [0] * padding,
        "labels": np.where(answer, ids, IGNORE_INDEX).tolist() + [IGNORE_INDEX] * padding,
    }


class ChatDataModule(DataModule):
    """Conversations rendered with the teacher's chat template, loss on the assistant turns only.

    Args:
        data_dir / pattern / val_files / test_files / hub_dataset / hub_config: where the conversations are
            (see :class:`~distill.data.documents.DocumentSource`).
        cache_dir: where hub downloads and table reads are cached.
        tokenizer: the teacher's tokenizer (name, folder or GGUF reference); it must have a chat template.
        messages_field: the column holding each conversation's list of ``{role, content}``.
        max_length: tokens per row; longer conversations are cut.
    """

    task = "causal_lm"
    # The held-out references are the conversations' own assistant turns.
    references_are_teachers = False

    def __init__(
        self,
        data_dir: str,
        cache_dir: str,
        tokenizer: str,
        val_files: Sequence[str] = (),
        test_files: Sequence[str] = (),
        pattern: str = "*.jsonl",
        hub_dataset: str | None = None,
        hub_config: str | None = None,
        messages_field: str = "messages",
        max_length: int = 256,
        batch_size: int = 8,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.check_settings(max_length, batch_size, eval_batch_size)
        self.source = DocumentSource(
            Path(data_dir).expanduser(),
            Path(cache_dir).expanduser(),
            pattern,
            list(val_files),
            list(test_files),
            hub_dataset,
            hub_config,
            text_field=messages_field,
            field_option="messages_field",
        )
        self.max_length, self.batch_size, self.eval_batch_size = max_length, batch_size, eval_batch_size
        self.num_workers, self.seed = num_workers, seed
        self.tokenizer = load_tokenizer(tokenizer)
        self.tokenizer_key = tokenizer_fingerprint(self.tokenizer)
        pad_id = self.tokenizer.pad_token_id
        self.pad_id = document_separator(self.tokenizer) if pad_id is None else pad_id
        self.splits: dict[str, datasets.Dataset] = {}
        self._documents: dict[str, SplitDocuments] | None = None

    @staticmethod
    def check_settings(max_length: int, batch_size: int, eval_batch_size: int) -> None:
        """The constructor's range checks, which :func:`distill.config.schemas.validate` also runs on ``data``."""
        if max_length < 2:
            raise ValueError(f"data.max_length={max_length!r} must be at least 2 (a row predicts all but its first)")
        check_batch_sizes(batch_size, eval_batch_size)

    def prepare_data(self) -> None:
        """Read the conversations (a row without ``messages_field`` is an error here, before any teacher stage)."""
        if self._documents is None:
            if self.tokenizer.chat_template is None:
                raise ValueError(
                    f"tokenizer {self.tokenizer.name_or_path!r} has no chat template to render conversations with:"
                    " use an instruction model's tokenizer (data.tokenizer=...) or a text corpus (data=files)"
                )
            self._documents = self.source.load()

    def conversations(self, split: str) -> list[list[dict]]:
        """The conversations of ``split``, as rows of ``messages``: a prompt pool's source (data=chat_prompts)."""
        self.prepare_data()
        return list(self._documents[split].texts["text"])

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.prepare_data()
        splits = {split: self._rows(split, documents) for split, documents in self._documents.items()}
        splits["train"] = splits["train"].add_column(EXAMPLE_INDEX, list(range(len(splits["train"]))))
        self.splits = {split: rows.with_format("torch") for split, rows in splits.items()}

    def _rows(self, split: str, documents: SplitDocuments) -> datasets.Dataset:
        rows = [
            chat_row(self.tokenizer, messages, self.max_length, self.pad_id) for messages in documents.texts["text"]
        ]
        kept = [row for row in rows if any(label != IGNORE_INDEX for label in row["labels"])]
        if len(kept) < len(rows):
            log.warning(
                "%d of %d %s conversations have no assistant token within data.max_length=%d: dropped",
                len(rows) - len(kept),
                len(rows),
                split,
                self.max_length,
            )
        columns = {name: [row[name] for row in kept] for name in BLOCK_FEATURES}
        return datasets.Dataset.from_dict(columns, features=BLOCK_FEATURES)

    @property
    def positions_per_example(self) -> int:
        return self.max_length

    def train_fingerprint(self) -> str:
        """Identity of the training rows: the conversations, the tokenizer (its template) and the row length."""
        self.setup("fit")
        source = self._documents["train"].source_key
        return digest([source, self.tokenizer_key, self.max_length, len(self.splits["train"])])

    def teacher_key_fields(self) -> dict[str, Any]:
        return {"train": self.train_fingerprint(), "validation": list(self._documents["validation"].names)}

    def check_context(self, max_positions: int) -> None:
        check_max_length(self.max_length, max_positions)

    def reference_prompts(self, split: str, count: int, *lengths: int) -> list[tuple[list[int], list[int]]]:
        """``count`` evenly spaced held-out (conversation up to its first answer, that answer) token ids (whole
        turns: the ``lengths`` a text corpus cuts its prompts by do not apply)."""
        self.setup()
        rows = self.splits[split]
        picked = rows.select([row * len(rows) // count for row in range(min(count, len(rows)))])[:]
        pairs = []
        starts = prompt_lengths(picked["labels"], picked["attention_mask"])
        for ids, labels, start in zip(picked["input_ids"].tolist(), picked["labels"].tolist(), starts, strict=True):
            answer = next((end for end in range(start, len(labels)) if labels[end] == IGNORE_INDEX), len(labels))
            pairs.append((ids[:start], ids[start:answer]))
        return pairs

    def extra_test_loaders(self) -> dict[str, DataLoader]:
        """Held-out loaders beyond the test split: none (the test conversations are the held-out set)."""
        return {}
