"""Student construction: a layer subset of the teacher, a smaller config, or a pretrained model.

Each builder takes the prepared :class:`~distill.models.teacher.Teacher` and the data module
(which builders that measure on calibration data use: :mod:`distill.pruning.structured`)
and returns a trainable Hugging Face model of the teacher's kind with the teacher's vocabulary.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_object
from torch import Tensor, nn
from transformers import (
    PreTrainedModel,
)

from distill.architectures.linears import block_stack
from distill.data.base import DataModule
from distill.models.teacher import Teacher
from distill.pruning.shape import PartialShape
from distill.utils.references import load_tokenizer, resolve
from distill.utils.settings import settings_of


def transformer_layer_params(model: PreTrainedModel) -> int:
    """Parameters inside the transformer layers (embeddings and heads excluded)."""
    return sum(param.numel() for param in block_stack(model)[1].parameters())


def _trainable(model: PreTrainedModel) -> PreTrainedModel:
    model.requires_grad_(True)
    return model.train()


def from_teacher(teacher: Teacher, layers: list[int], datamodule: DataModule | None = None) -> PreTrainedModel:
    """DistilBERT-style: copy the teacher, keep ``layers`` (in order), weights included."""
    depth = teacher.model.config.num_hidden_layers
    bad = [index for index in layers if not 0 <= index < depth]
    if not layers or bad or len(set(layers)) != len(layers):
        raise ValueError(f"student.layers={list(layers)!r} must be distinct indices in [0, {depth - 1}]")
    student = copy.deepcopy(teacher.model)
    path, stack = block_stack(student)
    parent_path, _, attribute = path.rpartition(".")
    kept = nn.ModuleList([stack[index] for index in layers])
    for new_index, layer in enumerate(kept):
        # Attention modules that know their index use it to address caches.
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    setattr(student.get_submodule(parent_path), attribute, kept)
    student.config.num_hidden_layers = len(layers)
    return _trainable(student)


def from_config(
    teacher: Teacher,
    num_hidden_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    intermediate_size: int,
    datamodule: DataModule | None = None,
) -> PreTrainedModel:
    """A randomly initialised model of the teacher's type and vocabulary with smaller sizes."""
    if hidden_size % num_attention_heads:
        raise ValueError(
            f"student.hidden_size={hidden_size} is not divisible by student.num_attention_heads={num_attention_heads}"
        )
    config = copy.deepcopy(teacher.model.config)
    config.update(
        {
            "num_hidden_layers": num_hidden_layers,
            "hidden_size": hidden_size,
            "num_attention_heads": num_attention_heads,
            "intermediate_size": intermediate_size,
        }
    )
    return _trainable(teacher.task.auto_model.from_config(config))


def check_same_tokenizer(teacher_reference: str, student_reference: str) -> None:
    """A pretrained student must tokenize as its teacher does: logits of other tokenizers do not refer
    to the same tokens (cross-tokenizer distillation is not supported)."""
    student_vocab = load_tokenizer(student_reference).get_vocab()
    teacher_vocab = load_tokenizer(teacher_reference).get_vocab()
    if student_vocab != teacher_vocab:
        raise ValueError(
            f"student {student_reference!r} has a different tokenizer ({len(student_vocab)} tokens) from "
            f"teacher {teacher_reference!r} ({len(teacher_vocab)} tokens): logits would not refer to the same "
            "tokens; distil into a student that shares the teacher's tokenizer"
        )


def from_pretrained(teacher: Teacher, name_or_path: str, datamodule: DataModule | None = None) -> PreTrainedModel:
    """A pretrained Hugging Face model (hub id, folder or GGUF file); its tokenizer must equal the teacher's."""
    name_or_path = resolve(name_or_path)
    check_same_tokenizer(teacher.path, name_or_path)
    return _trainable(teacher.task.auto_model.from_pretrained(name_or_path, **teacher.task.model_kwargs()))


def shared_vocabulary(teacher: Teacher, student: PreTrainedModel, tokenizer: Any) -> int | None:
    """The leading token ids whose logits teacher and student compare: ``None`` (all) when their
    ``vocab_size`` agree; else the tokenizer's ids, when only the padding of the embedding differs
    (e.g. 151,936 vs 152,064 rows for one tokenizer: the extra rows are no token's)."""
    if teacher.model is None:  # a served teacher's top-k ids are its tokenizer's ids, which the student shares
        return None
    teacher_size, student_size = teacher.model.config.vocab_size, student.config.vocab_size
    if teacher_size == student_size:
        return None
    tokens = len(tokenizer) if tokenizer is not None else None
    if tokens is None or tokens > min(teacher_size, student_size):
        raise ValueError(
            f"student vocab_size={student_size} differs from teacher vocab_size={teacher_size} "
            f"({teacher.path!r}) and the tokenizer's {tokens} tokens do not fit both: teacher and student must "
            "share a vocabulary"
        )
    return tokens


def check_context(model: PreTrainedModel | None, datamodule: DataModule) -> None:
    """The data's rows must fit the model's positions (models without a fixed window take any length; a served
    teacher, ``None`` here, has its server refuse what it cannot take)."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if context is not None:
        datamodule.check_context(context)


def check_student(student: Mapping[str, Any], teacher_model: PreTrainedModel) -> None:
    """Refuse, right after the teacher stage and before the generation and teacher-logit stages, a ``student``
    node its builder cannot make from this teacher: a ``pruned`` shape the family cannot express, or a width
    cut of a family without a layout (the builder itself would refuse only after those stages)."""
    from distill.pruning.structured import student_shape

    if get_object(student["_target_"]) is pruned:
        shape = settings_of(PartialShape, student.get("shape")).given()
        student_shape(teacher_model, student.get("target_params"), shape, student.get("axes", ("depth",)))


def draw_calibration_batches(datamodule: DataModule, count: int) -> list[dict[str, Tensor]]:
    """``count`` training batches (inputs only): calibration data is never held-out text."""
    datamodule.prepare_data()
    batches = []
    for batch in datamodule.calibration_dataloader():
        batches.append({key: batch[key] for key in ("input_ids", "attention_mask")})
        if len(batches) == count:
            return batches
    raise ValueError(f"student.calibration_batches={count} is more than the {len(batches)} training batches")


def pruned(
    teacher: Teacher,
    datamodule: DataModule,
    calibration_batches: int = 8,
    shape: PartialShape | None = None,
    report_path: str | None = None,
    cache_dir: str | None = None,
    **settings: Any,
) -> PreTrainedModel:
    """A smaller dense student cut from the teacher by importance measured on training batches
    (:func:`distill.pruning.structured.pruned_student` takes ``settings``); ``shape`` fields
    left ``None`` keep the teacher's, and a shape with none set is no shape. With ``cache_dir``, the cut is
    reused by every run of the same teacher, calibration tokens and settings (:mod:`distill.stores.pruned_students`)."""
    from distill.pruning.structured import pruned_student
    from distill.stores.pruned_students import cached_pruned_student, pruned_cache_key

    if calibration_batches < 1:
        raise ValueError(f"student.calibration_batches={calibration_batches!r} must be >= 1")
    batches = draw_calibration_batches(datamodule, calibration_batches)
    settings["shape"] = settings_of(PartialShape, shape).given()

    def prune(report: str | None) -> PreTrainedModel:
        # Its own generator: a cut made here or read from the cache leaves the run's random stream alike.
        with torch.random.fork_rng():
            return pruned_student(teacher.model, batches, report_path=report, **settings)

    if not cache_dir:
        return prune(report_path)
    key = pruned_cache_key(teacher.model, batches, settings)
    return cached_pruned_student(Path(cache_dir).expanduser(), key, type(teacher.model), prune, report_path)
