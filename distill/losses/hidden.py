"""Hidden-state distillation: pull chosen student layers' token states onto teacher layers'.

Contract of :func:`hidden_state_loss`::

    loss = mean over layer pairs (s, t) of  MSE(P_s(h_student[s]), h_teacher[t])

* ``h[k]`` is the output of transformer layer ``k`` (0-based), i.e. Hugging Face's
  ``hidden_states[k + 1]``; the embedding output is never matched.
* The squared error is averaged over the hidden dimension and over the tokens whose
  ``attention_mask`` is 1, so padding never counts and batch padding does not change the value.
* Computed in fp32 whatever the input dtype. ``P_s`` is the identity when widths agree and a
  learned linear map (TinyBERT's W_h) when they differ; it lives in :class:`HiddenStateLoss`,
  never in the student, so an exported student is unchanged.

Logits carry about one bit per example on a two-class task and a fine-tuned teacher mostly
agrees with the labels it was trained on, so logit KD alone adds little over hard labels; token
states carry far more of what the teacher knows (Sun et al. 2019, Jiao et al. 2020).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def hidden_state_loss(student_states: Tensor, teacher_states: Tensor, attention_mask: Tensor) -> Tensor:
    """Masked mean squared error between ``(B, L, H)`` token states, in fp32."""
    if student_states.shape != teacher_states.shape:
        raise ValueError(
            f"hidden states differ in shape: {tuple(student_states.shape)} vs {tuple(teacher_states.shape)}"
        )
    squared = (student_states.float() - teacher_states.float()).pow(2).mean(dim=-1)
    mask = attention_mask.to(squared.dtype)
    return (squared * mask).sum() / mask.sum().clamp(min=1)


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Student layer ``i`` matches teacher layer ``ceil((i + 1) * T / S) - 1``: the last matches the last."""
    return [-(-(i + 1) * teacher_layers // student_layers) - 1 for i in range(student_layers)]


class HiddenStateLoss(nn.Module):
    """:func:`hidden_state_loss` averaged over ``student layer i -> teacher layer layer_map[i]``."""

    def __init__(self, layer_map: Sequence[int], student_width: int, teacher_width: int, teacher_layers: int) -> None:
        super().__init__()
        bad = [layer for layer in layer_map if not 0 <= layer < teacher_layers]
        if bad:
            raise ValueError(
                f"distill.hidden_layers={list(layer_map)} names teacher layers {bad}; it has {teacher_layers}"
            )
        self.layer_map = list(layer_map)
        widths_differ = student_width != teacher_width
        self.projections = nn.ModuleList(
            nn.Linear(student_width, teacher_width) if widths_differ else nn.Identity() for _ in self.layer_map
        )

    @classmethod
    def between(cls, student: nn.Module, teacher: nn.Module | None, layers: Sequence[int] | None) -> HiddenStateLoss:
        """The loss from ``student``'s layers to ``teacher``'s: ``layers`` names one teacher layer per student
        layer; ``None`` spreads them uniformly."""
        if teacher is None:
            raise ValueError("distill.hidden_weight > 0 needs a teacher")
        student_layers, teacher_layers = student.config.num_hidden_layers, teacher.config.num_hidden_layers
        layers = list(layers) if layers is not None else uniform_layer_map(student_layers, teacher_layers)
        if len(layers) != student_layers:
            raise ValueError(
                f"distill.hidden_layers={layers} needs one teacher layer per student layer ({student_layers})"
            )
        return cls(layers, student.config.hidden_size, teacher.config.hidden_size, teacher_layers)

    def forward(
        self, student_hidden: Sequence[Tensor], teacher_hidden: Sequence[Tensor], attention_mask: Tensor
    ) -> Tensor:
        if len(student_hidden) != len(self.layer_map) + 1:
            raise ValueError(
                f"distill.hidden_layers has {len(self.layer_map)} entries;"
                f" the student has {len(student_hidden) - 1} layers"
            )
        losses = [
            hidden_state_loss(project(student_hidden[i + 1]), teacher_hidden[t + 1], attention_mask)
            for i, (t, project) in enumerate(zip(self.layer_map, self.projections, strict=True))
        ]
        return torch.stack(losses).mean()
