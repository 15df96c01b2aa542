"""Transfer-set augmentation: perturbed unlabelled copies, and how the module learns from them."""

from __future__ import annotations

import random
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from distill.data.augment import AugmentingCollator, TokenAugmenter, sequence_fingerprint
from distill.losses.kd import kd_loss_terms
from distill.utils.keys import AUGMENTED_PREFIX
from tests.test_data import write_task
from tests.test_module import make_module

CLS, SEP, MASK = 101, 102, 103
SPECIAL = frozenset({0, CLS, SEP, MASK})


def sentence(*words: int) -> list[int]:
    return [CLS, *words, SEP]


def augmenter(**settings) -> TokenAugmenter:
    base = dict(copies=1, mask_prob=0.0, replace_prob=0.0, span_prob=0.0)
    return TokenAugmenter(mask_token_id=MASK, special_ids=SPECIAL, **{**base, **settings})


def test_masking_keeps_special_tokens_and_length() -> None:
    out = augmenter(mask_prob=1.0)([sentence(7, 8, 9)], random.Random(0))
    assert out == [[CLS, MASK, MASK, MASK, SEP]]


def test_replacements_come_from_the_batch_text() -> None:
    batch = [sentence(7, 8, 9), sentence(20, 21)]
    for ids in augmenter(replace_prob=1.0)(batch, random.Random(0)):
        assert ids[0] == CLS and ids[-1] == SEP
        assert set(ids[1:-1]) <= {7, 8, 9, 20, 21}


def test_span_sampling_keeps_a_contiguous_window() -> None:
    words = list(range(10, 30))
    rng = random.Random(0)
    for _ in range(50):
        (ids,) = augmenter(span_prob=1.0, max_span=3)([sentence(*words)], rng)
        kept = ids[1:-1]
        assert ids[0] == CLS and ids[-1] == SEP and 1 <= len(kept) <= 3
        start = words.index(kept[0])
        assert kept == words[start : start + len(kept)]


def test_copies_come_copy_after_copy_and_repeat_with_the_seed() -> None:
    batch = [sentence(7, 8, 9, 10), sentence(20, 21)]
    make = augmenter(copies=3, mask_prob=0.3, replace_prob=0.2, span_prob=0.5)
    first = make(batch, random.Random(5))
    assert len(first) == 6
    assert first == make(batch, random.Random(5))
    assert first != make(batch, random.Random(6))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"mask_prob": 1.5}, "data.augment.mask_prob=1.5"),
        ({"mask_prob": 0.6, "replace_prob": 0.6}, "mask_prob + replace_prob = 1.2"),
        ({"max_span": 0}, "data.augment.max_span=0"),
        ({"copies": -1}, "data.augment.copies=-1"),
    ],
)
def test_bad_settings_name_the_value(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        augmenter(**settings)


def test_training_loader_alone_carries_copies(tmp_path: Path, glue_module) -> None:
    module = glue_module(write_task(tmp_path / "data"), tmp_path / "cache", augment={"copies": 2, "mask_prob": 0.5})
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert batch[AUGMENTED_PREFIX + "input_ids"].shape[0] == 2 * batch["input_ids"].shape[0]
    assert AUGMENTED_PREFIX + "labels" not in batch
    # The teacher's fine-tuning, its logit pass and evaluation read plain batches.
    for loader in (module.dataloader("train", 2, shuffle=True), module.val_dataloader()):
        assert not any(key.startswith(AUGMENTED_PREFIX) for key in next(iter(loader)))


def test_each_dataloader_worker_draws_its_own_stream(monkeypatch, tmp_path: Path, glue_module) -> None:
    module = glue_module(write_task(tmp_path / "data"), tmp_path / "cache", augment={"copies": 1, "mask_prob": 0.5})
    collate = AugmentingCollator(lambda features: {}, module.tokenizer, module.augmenter, seed=0)
    monkeypatch.setattr("distill.data.augment.get_worker_info", lambda: SimpleNamespace(seed=1234))
    assert collate._generator().random() == random.Random(1234).random()


def test_each_data_parallel_rank_draws_its_own_stream(tmp_path: Path, glue_module) -> None:
    module = glue_module(write_task(tmp_path / "data"), tmp_path / "cache", augment={"copies": 1, "mask_prob": 0.5})
    streams = [AugmentingCollator(None, module.tokenizer, module.augmenter, 7, rank)._generator() for rank in (0, 1)]
    draws = [[stream.random() for _ in range(4)] for stream in streams]
    single_process = random.Random(7 * 1009)
    assert draws[0] == [single_process.random() for _ in range(4)]  # rank 0 keeps a single process's stream
    assert draws[0] != draws[1]


def test_pair_tasks_refuse_cropping(tmp_path: Path, glue_module) -> None:
    with pytest.raises(ValueError, match=re.escape("data.augment.span_prob=0.25")):
        glue_module(tmp_path / "data", tmp_path / "cache", text_fields=["a", "b"], augment={"copies": 1})


def with_copies(batch: dict[str, torch.Tensor], copies: torch.Tensor) -> dict[str, torch.Tensor]:
    extra = {AUGMENTED_PREFIX + "input_ids": copies, AUGMENTED_PREFIX + "attention_mask": torch.ones_like(copies)}
    return {**batch, **extra}


def plain_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (4, 6), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 2, 1])}


def test_kd_term_averages_over_examples_and_copies() -> None:
    module = make_module(alpha=0.25).eval()
    copies = torch.randint(1, 50, (8, 5), generator=torch.Generator().manual_seed(1))
    loss = module.training_step(with_copies(plain_batch(), copies), 0)
    batch = plain_batch()
    labels = batch.pop("labels")
    inputs = [(batch, 4), ({"input_ids": copies, "attention_mask": torch.ones_like(copies)}, 8)]
    kd = [kd_loss_terms(module(x), module.teacher(x).logits, None, temperature=2.0, alpha=0.0).kd for x, _ in inputs]
    ce = torch.nn.functional.cross_entropy(module(batch), labels)
    expected = 0.25 * ce + 0.75 * (4 * kd[0] + 8 * kd[1]) / 12
    torch.testing.assert_close(loss, expected)


def test_hard_label_training_ignores_copies() -> None:
    module = make_module(alpha=1.0).eval()
    copies = torch.randint(1, 50, (4, 6), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        module.training_step(with_copies(plain_batch(), copies), 0), module.training_step(plain_batch(), 0)
    )


def test_fingerprint_sees_every_token_and_no_padding() -> None:
    ids = torch.tensor([[101, 7, 8, 102, 0], [101, 7, 8, 9, 102]])
    mask = (ids != 0).long()
    fingerprint = sequence_fingerprint(ids, mask)
    assert fingerprint[0] != fingerprint[1]
    padded = sequence_fingerprint(
        torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], 1),
        torch.cat([mask, torch.zeros(2, 3, dtype=torch.long)], 1),
    )
    assert torch.equal(padded, fingerprint)
    swapped = ids.clone()
    swapped[0, 1:3] = torch.tensor([8, 7])  # same tokens, other order
    assert sequence_fingerprint(swapped, mask)[0] != fingerprint[0]
