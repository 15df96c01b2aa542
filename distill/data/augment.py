"""Unlabelled transfer-set examples for the teacher to label (Tang et al., 2019, "Distilling
Task-Specific Knowledge from BERT into Simple Neural Networks", §3.2).

A fine-tuned teacher's logits on its own training set say little beyond the labels it was fitted
to; its answers on *perturbed* sentences are where distillation carries information the labels
cannot. Each training batch therefore carries ``copies`` perturbed copies of every example, built on
token ids so it works with any tokenizer:

* masking: each word piece becomes the tokenizer's mask token with probability ``mask_prob``;
* replacement: each word piece becomes a word piece drawn from the rest of the batch with
  probability ``replace_prob`` (the batch's own text stands in for Tang et al.'s same-part-of-speech
  word, so replacements follow the corpus' word distribution);
* n-gram sampling: with probability ``span_prob`` only a random window of 1 to ``max_span`` word
  pieces survives (single-sentence tasks only: cropping one side of a sentence pair breaks it).

The copies carry no labels: a perturbation may flip the sentiment ("not good" -> "good"), so only
the teacher's soft targets are trusted on them (see :class:`distill.modules.distillation.DistillationModule`).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.data import get_worker_info
from transformers import PreTrainedTokenizerBase

from distill.utils.keys import AUGMENTED_PREFIX, COPY_FINGERPRINT


# One int64 per perturbed copy (:func:`sequence_fingerprint`): lets a store of the teacher's logits on
# the copies (distill.stores.teacher_logits) check that it holds the very copies a batch carries.
def sequence_fingerprint(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(R,)`` int64 that changes with any token or the length of a row of ``(R, L)`` token ids.

    A weighted sum with fixed per-position weights below 2**28, so ids below 2**24 and rows up to
    1024 tokens cannot overflow; padding (``attention_mask`` 0) never counts.
    """
    positions = torch.arange(input_ids.shape[1], dtype=torch.long, device=input_ids.device)
    weights = (positions * 2654435761 + 97) % (2**28 - 57) + 1
    return ((input_ids.long() + 1) * attention_mask.long() * weights).sum(dim=1)


@dataclass
class AugmentSettings:
    """``data.augment`` of :class:`~distill.data.glue.GlueDataModule`: ``copies`` perturbed, unlabelled copies
    of each training example for the teacher to label (0 turns them off), perturbed as the module docstring says."""

    copies: int = 0
    mask_prob: float = 0.1
    replace_prob: float = 0.1
    span_prob: float = 0.25
    max_span: int = 5

    def __post_init__(self) -> None:
        for name in ("mask_prob", "replace_prob", "span_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"data.augment.{name}={value!r} must be in [0, 1]")
        if self.mask_prob + self.replace_prob > 1.0:
            raise ValueError(
                f"data.augment.mask_prob + replace_prob = {self.mask_prob + self.replace_prob!r} must be <= 1"
            )
        if self.copies < 0:
            raise ValueError(f"data.augment.copies={self.copies!r} must be >= 0 (0: no copies)")
        if self.max_span < 1:
            raise ValueError(f"data.augment.max_span={self.max_span!r} must be >= 1")


@dataclass
class TokenAugmenter(AugmentSettings):
    """Perturbs token-id sequences; special tokens (CLS, SEP, ...) are never touched."""

    mask_token_id: int = field(kw_only=True)
    special_ids: frozenset[int] = field(kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.copies < 1:
            raise ValueError(f"data.augment.copies={self.copies!r} must be >= 1 to build copies")

    def __call__(self, sequences: list[list[int]], rng: random.Random) -> list[list[int]]:
        """``copies`` perturbed versions of the batch, copy after copy."""
        pool = [token for ids in sequences for token in ids if token not in self.special_ids]
        return [self._perturb(ids, pool, rng) for _ in range(self.copies) for ids in sequences]

    def _perturb(self, ids: list[int], pool: list[int], rng: random.Random) -> list[int]:
        words = [i for i, token in enumerate(ids) if token not in self.special_ids]
        if self.span_prob > 0 and words and rng.random() < self.span_prob:
            length = rng.randint(1, min(self.max_span, len(words)))
            start = rng.randint(0, len(words) - length)
            dropped = set(words[:start] + words[start + length :])
            ids = [token for i, token in enumerate(ids) if i not in dropped]
        out = []
        for token in ids:
            draw = rng.random() if token not in self.special_ids else 1.0
            if draw < self.mask_prob:
                token = self.mask_token_id
            elif draw < self.mask_prob + self.replace_prob and pool:
                token = rng.choice(pool)
            out.append(token)
        return out


class AugmentingCollator:
    """Pads a batch as ``collate`` does and adds ``augmented_*`` tensors: the perturbed copies."""

    def __init__(
        self, collate: Any, tokenizer: PreTrainedTokenizerBase, augmenter: TokenAugmenter, seed: int, rank: int = 0
    ):
        self.collate = collate
        self.tokenizer = tokenizer
        self.augmenter = augmenter
        self.seed = seed
        self.rank = rank
        self._rng: random.Random | None = None

    def _generator(self) -> random.Random:
        if self._rng is None:
            # A DataLoader worker holds its own copy of this collator and takes PyTorch's per-worker
            # seed (derived from the run's seed, new each epoch), so workers and epochs draw different
            # copies. The main process (num_workers=0) draws one stream from the data seed and its
            # data-parallel rank, so ranks perturb differently; seed * 1009 (rank 0) is the stream
            # the figures in docs/results were measured with.
            info = get_worker_info()
            self._rng = random.Random(info.seed if info is not None else self.seed * 1009 + self.rank)
        return self._rng

    def state_dict(self) -> dict[str, Any]:
        """The stream's position, which a training loader checkpoints (:mod:`distill.data.resumable`)."""
        return {"random": self._generator().getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._generator().setstate(state["random"])

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collate(features)
        perturbed = self.augmenter([list(f["input_ids"]) for f in features], self._generator())
        encoded: dict[str, list[list[int]]] = {"input_ids": perturbed}
        if "token_type_ids" in features[0]:
            # Pairs keep their length (no cropping); a cropped single sentence is all segment 0.
            segments = [list(f["token_type_ids"]) for f in features] * self.augmenter.copies
            encoded["token_type_ids"] = [seg[: len(ids)] for seg, ids in zip(segments, perturbed, strict=True)]
        copies = self.tokenizer.pad(encoded, return_tensors="pt")
        for name, value in copies.items():
            batch[AUGMENTED_PREFIX + name] = value
        batch[COPY_FINGERPRINT] = sequence_fingerprint(copies["input_ids"], copies["attention_mask"])
        return batch


def build_augmenter(
    tokenizer: PreTrainedTokenizerBase, pair_task: bool, settings: AugmentSettings
) -> TokenAugmenter | None:
    """A :class:`TokenAugmenter` for ``tokenizer`` (``None`` if ``copies=0``); refuses what the task cannot use."""
    if settings.copies == 0:
        return None
    if tokenizer.mask_token_id is None:
        raise ValueError(f"data.augment needs a tokenizer with a mask token; {tokenizer.name_or_path!r} has none")
    augmenter = TokenAugmenter(
        **asdict(settings), mask_token_id=tokenizer.mask_token_id, special_ids=frozenset(tokenizer.all_special_ids)
    )
    if pair_task and augmenter.span_prob > 0:
        raise ValueError(
            f"data.augment.span_prob={augmenter.span_prob!r} crops one sentence of a pair; use 0 for pair tasks"
        )
    return augmenter
