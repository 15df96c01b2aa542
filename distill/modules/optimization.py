"""The student's optimizer and learning-rate schedule: AdamW-style decay on weights only, linear warm-up
then linear decay to 0 over the run's optimizer steps (stepped every step, not every epoch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

# Biases and norm weights take no weight decay (as in BERT's recipe and Hugging Face's Trainer).
NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


def optimizer_with_schedule(
    factory: Callable[..., torch.optim.Optimizer],
    named_parameters: list[tuple[str, nn.Parameter]],
    warmup_ratio: float,
    total_steps: int,
) -> dict[str, Any]:
    """Lightning's ``configure_optimizers`` answer for the trainable ``named_parameters``."""
    decay, no_decay = [], []
    for name, param in named_parameters:
        if param.requires_grad:
            (no_decay if name.endswith(NO_DECAY) else decay).append(param)
    optimizer = factory(params=[{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
    warmup = int(warmup_ratio * total_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
