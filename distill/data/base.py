"""The contract between a data module and the rest of a run.

:class:`DataModule` lists everything the run, the teacher and student stages, the stores, export and serving
may ask of data; nothing outside :mod:`distill.data` reads a data module's other members or probes for
optional ones. A capability that some data lacks has a documented answer here (no perturbed copies, no
generation stage), so callers never test for it. :class:`LanguageModelData` adds what the causal-LM task
needs for its held-out samples. A new kind of data subclasses :class:`DataModule` (see the README's
"Add a task").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Protocol

import datasets
import lightning.pytorch as pl
from torch import nn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from distill.data.split_loaders import SplitLoaders

if TYPE_CHECKING:
    from distill.data.augment import TokenAugmenter


class DataModule(SplitLoaders, pl.LightningDataModule, ABC):
    """A Lightning data module with the splits, loaders and facts a distillation run relies on.

    Attributes every data module sets:
        task: the data's name in cache keys and folder names (a GLUE task such as ``sst2``, ``causal_lm``).
        tokenizer: the tokenizer both models read the inputs with.
        splits: ``train`` / ``validation`` (/ ``test``) datasets, once :meth:`setup` ran; rows are model
            inputs plus ``labels`` (and, in training, the keys of :mod:`distill.utils.keys`).
        batch_size, eval_batch_size, num_workers, seed: what the loaders use.
        num_labels: the classes of a classification dataset; ``None`` where the labels are tokens.
        augmenter: the perturbed unlabelled copies a training batch carries (:mod:`distill.data.augment`);
            ``None``: batches carry none.
        positions_per_example: the positions of one training row that the teacher-logit store keeps targets
            for: 1 for one prediction per example, the block length for token-level data.
        prompt_pool: whether the training responses are the teacher's (:meth:`attach_teacher`), so that the
            student's own samples of the same prompts can replace them (on-policy distillation).
    """

    task: str
    tokenizer: PreTrainedTokenizerBase
    splits: dict[str, datasets.Dataset]
    num_workers: int
    seed: int
    num_labels: int | None = None
    augmenter: TokenAugmenter | None = None
    positions_per_example: int = 1
    prompt_pool: bool = False

    @abstractmethod
    def train_fingerprint(self) -> str:
        """The identity of the training rows as batches see them (source, tokenisation, slice): stores key on it."""

    @abstractmethod
    def teacher_key_fields(self) -> dict[str, Any]:
        """What of the data decides a teacher fine-tuned on it (part of the fine-tuned teacher's cache key)."""

    @abstractmethod
    def check_context(self, max_positions: int) -> None:
        """Raise ``ValueError`` naming the setting if a row can be longer than a model's ``max_positions``."""

    def attach_teacher(self, teacher: nn.Module) -> dict[str, float]:
        """The generation stage: data that trains on the teacher's responses makes (or reuses) them here and
        returns the stage's statistics. Data with targets of its own has no generation stage: ``{}``."""
        return {}


def check_max_length(max_length: int, max_positions: int) -> None:
    """Rows of at most ``data.max_length`` tokens must fit a model's ``max_positions``."""
    if max_length > max_positions:
        raise ValueError(
            f"data.max_length={max_length} exceeds the model's {max_positions} positions "
            f"(max_position_embeddings): set data.max_length<={max_positions}"
        )


class LanguageModelData(Protocol):
    """What the causal-LM task asks of its data beyond :class:`DataModule`, for the export's held-out samples."""

    tokenizer: PreTrainedTokenizerBase
    #: the held-out references are the teacher's own greedy responses (its ROUGE-L would be 100 by construction)
    references_are_teachers: bool

    def reference_prompts(
        self, split: str, count: int, prompt_tokens: int, new_tokens: int
    ) -> list[tuple[list[int], list[int]]]: ...

    def extra_test_loaders(self) -> dict[str, DataLoader]: ...

    def test_dataloader(self) -> DataLoader: ...
