"""Student builders and the vocabulary check."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification

from distill.models.student import (
    from_config,
    from_pretrained,
    from_teacher,
    shared_vocabulary,
    transformer_layer_params,
)
from distill.models.teacher import Teacher
from distill.tasks import ClassificationTask


@pytest.fixture
def tiny_teacher(tiny_teacher_dir: Path) -> Teacher:
    model = AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir)
    return Teacher(model=model.eval().requires_grad_(False), path=str(tiny_teacher_dir), task=ClassificationTask(2))


def test_from_teacher_copies_the_chosen_layers(tiny_teacher: Teacher) -> None:
    student = from_teacher(tiny_teacher, layers=[1])
    assert student.config.num_hidden_layers == 1 and len(student.bert.encoder.layer) == 1
    assert tiny_teacher.model.config.num_hidden_layers == 2 and len(tiny_teacher.model.bert.encoder.layer) == 2
    kept, source = student.bert.encoder.layer[0].state_dict(), tiny_teacher.model.bert.encoder.layer[1].state_dict()
    assert all(torch.equal(kept[key], source[key]) for key in source)
    assert torch.equal(
        student.bert.embeddings.word_embeddings.weight, tiny_teacher.model.bert.embeddings.word_embeddings.weight
    )
    assert student.training and all(param.requires_grad for param in student.parameters())
    assert not any(param.requires_grad for param in tiny_teacher.model.parameters())


def test_from_teacher_student_runs_and_saves(tiny_teacher: Teacher, tmp_path: Path) -> None:
    student = from_teacher(tiny_teacher, layers=[0])
    inputs = {"input_ids": torch.tensor([[101, 2204, 102]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    expected = student.eval()(**inputs).logits
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert torch.allclose(reloaded(**inputs).logits, expected, atol=1e-6)


@pytest.mark.parametrize("layers", [[2], [0, 0], [], [-1]])
def test_from_teacher_rejects_bad_layers(tiny_teacher: Teacher, layers: list[int]) -> None:
    with pytest.raises(ValueError, match=re.escape(f"student.layers={layers!r}")):
        from_teacher(tiny_teacher, layers=layers)


def test_from_config_is_random_and_smaller(tiny_teacher: Teacher) -> None:
    student = from_config(
        tiny_teacher, num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32
    )
    assert student.config.vocab_size == tiny_teacher.model.config.vocab_size
    assert transformer_layer_params(student) < transformer_layer_params(tiny_teacher.model)
    with pytest.raises(ValueError, match=r"student\.hidden_size=18 is not divisible"):
        from_config(tiny_teacher, num_hidden_layers=1, hidden_size=18, num_attention_heads=4, intermediate_size=32)


def test_vocabulary_mismatch_is_an_error(tiny_teacher: Teacher, tmp_path: Path) -> None:
    other = BertForSequenceClassification(
        BertConfig(vocab_size=1000, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    with pytest.raises(ValueError, match=r"student vocab_size=1000 differs from teacher vocab_size=30522"):
        shared_vocabulary(tiny_teacher, other, AutoTokenizer.from_pretrained(tiny_teacher.path))
    assert shared_vocabulary(tiny_teacher, tiny_teacher.model, None) is None


def test_pretrained_student_with_other_tokenizer_is_rejected(tiny_teacher: Teacher, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"has a different tokenizer \(2 tokens\)"):
        from_pretrained(tiny_teacher, str(tmp_path))


def test_default_student_has_three_times_fewer_layer_parameters(compose_train, hf_teacher_available: str) -> None:
    cfg = compose_train("experiment=bert_to_tiny", "paths.output_dir=/tmp/unused")
    model = AutoModelForSequenceClassification.from_pretrained(hf_teacher_available, num_labels=2)
    teacher = Teacher(model=model, path=hf_teacher_available, task=ClassificationTask(2))
    student = from_teacher(teacher, layers=list(cfg.student.layers))
    assert transformer_layer_params(model) >= 3 * transformer_layer_params(student)


def test_mismatched_tokenizers_fail_before_any_stage(
    compose_train, tiny_run_overrides: list[str], tmp_path: Path
) -> None:
    """One error naming both, before the teacher stage spends any time (its cache stays empty)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from distill.train import train

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    other = tmp_path / "other_student"
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(other)
    overrides = [item for item in tiny_run_overrides if not item.startswith("student.")]
    cfg = compose_train(*overrides, "student=pretrained", f"student.name_or_path={other}")
    with pytest.raises(
        ValueError, match=rf"student '{other}' has a different tokenizer .* from teacher '.*tiny_teacher"
    ):
        train(cfg)
    assert not (tmp_path / "cache" / "teachers").exists()
