"""What a checkpoint of the distillation module says about its student, and how to read it back.

A checkpoint describes its own student (config and class), so the student loads without config
files or the teacher. APEX ASP saves its masks as ``<layer>.__weight_mma_mask`` buffers: loading
moves them aside (under ``ASP_MASK_KEY``) so the plain student loads strictly and the N:M callback
(either backend, :mod:`distill.callbacks.nm_sparsity`) picks them up.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoConfig, PreTrainedModel

from distill.utils.sharding import plain_class

ASP_MASK_KEY = "asp_masks"
ASP_BUFFER = re.compile(r"__(\w+?)_mma_(?:mask|pruned_p)")
STUDENT_PREFIX = "student."


def describe_student(checkpoint: dict[str, Any], student: nn.Module) -> None:
    checkpoint["student_config"] = student.config.to_dict()
    checkpoint["student_class"] = plain_class(student).__name__


def set_asp_masks_aside(checkpoint: dict[str, Any]) -> None:
    """Move ASP's mask buffers out of the state dict, as masks by layer weight under ``ASP_MASK_KEY``."""
    state = checkpoint.get("state_dict", {})  # trainer=fsdp's strategy loads (and drops) it before this hook
    asp_keys = [key for key in state if ASP_BUFFER.fullmatch(key.rsplit(".", 1)[-1])]
    masks = {}
    for key in asp_keys:
        value = state.pop(key)
        layer, buffer = key.rsplit(".", 1)
        if buffer.endswith("_mma_mask"):
            masks[f"{layer}.{ASP_BUFFER.fullmatch(buffer).group(1)}"] = value.bool()
    if masks:
        checkpoint[ASP_MASK_KEY] = masks


def load_student(checkpoint_path: str) -> PreTrainedModel:
    """Rebuild the student from a Lightning checkpoint of the distillation module, in eval mode."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    student_config = dict(checkpoint["student_config"])
    config = AutoConfig.for_model(student_config.pop("model_type"), **student_config)
    # Checkpoints written before the class was recorded hold sequence classifiers.
    name = checkpoint.get("student_class", "AutoModelForSequenceClassification")
    model_class = getattr(transformers, name)
    student = model_class.from_config(config) if name.startswith("Auto") else model_class(config)
    state = checkpoint["state_dict"]
    student.load_state_dict(
        {key.removeprefix(STUDENT_PREFIX): v for key, v in state.items() if key.startswith(STUDENT_PREFIX)}
    )
    return student.eval()
