"""Student construction: a layer subset of the teacher, a smaller config, or a pretrained model.

Each builder takes the prepared :class:`~distill.models.teacher.Teacher` and returns a
trainable Hugging Face sequence-classification model with the teacher's vocabulary.
"""

from __future__ import annotations

import copy

from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from distill.models.teacher import Teacher


def encoder_layers(model: PreTrainedModel) -> tuple[nn.Module, str, nn.ModuleList]:
    """Find the stack of transformer layers: (parent module, attribute name, the ModuleList)."""
    depth = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == depth and name.split(".")[-1] in {"layer", "layers"}:
            parent_name, _, attribute = name.rpartition(".")
            return model.get_submodule(parent_name), attribute, module
    raise ValueError(f"{type(model).__name__} has no ModuleList of {depth} transformer layers named layer/layers")


def transformer_layer_params(model: PreTrainedModel) -> int:
    """Parameters inside the transformer layers (embeddings and heads excluded)."""
    return sum(param.numel() for param in encoder_layers(model)[2].parameters())


def _trainable(model: PreTrainedModel) -> PreTrainedModel:
    model.requires_grad_(True)
    return model.train()


def from_teacher(teacher: Teacher, layers: list[int]) -> PreTrainedModel:
    """DistilBERT-style: copy the teacher, keep ``layers`` (in order), weights included."""
    depth = teacher.model.config.num_hidden_layers
    bad = [index for index in layers if not 0 <= index < depth]
    if not layers or bad or len(set(layers)) != len(layers):
        raise ValueError(f"student.layers={list(layers)!r} must be distinct indices in [0, {depth - 1}]")
    student = copy.deepcopy(teacher.model)
    parent, attribute, stack = encoder_layers(student)
    kept = nn.ModuleList([stack[index] for index in layers])
    for new_index, layer in enumerate(kept):
        # Attention modules that know their index use it to address caches.
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    setattr(parent, attribute, kept)
    student.config.num_hidden_layers = len(layers)
    return _trainable(student)


def from_config(
    teacher: Teacher, num_hidden_layers: int, hidden_size: int, num_attention_heads: int, intermediate_size: int
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
    return _trainable(AutoModelForSequenceClassification.from_config(config))


def from_pretrained(teacher: Teacher, name_or_path: str) -> PreTrainedModel:
    """A pretrained Hugging Face model; its tokenizer must equal the teacher's."""
    student_vocab = AutoTokenizer.from_pretrained(name_or_path).get_vocab()
    teacher_vocab = AutoTokenizer.from_pretrained(teacher.path).get_vocab()
    if student_vocab != teacher_vocab:
        raise ValueError(
            f"student {name_or_path!r} has a different vocabulary ({len(student_vocab)} tokens) from "
            f"teacher {teacher.path!r} ({len(teacher_vocab)} tokens): logits would not refer to the same inputs"
        )
    model = AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=teacher.model.config.num_labels)
    return _trainable(model)


def check_same_vocabulary(teacher: Teacher, student: PreTrainedModel) -> None:
    """Teacher and student must embed the same token ids."""
    teacher_size, student_size = teacher.model.config.vocab_size, student.config.vocab_size
    if teacher_size != student_size:
        raise ValueError(
            f"student vocab_size={student_size} differs from teacher vocab_size={teacher_size} "
            f"({teacher.path!r}): teacher and student must share a vocabulary"
        )
