"""The student's optimizer and learning-rate schedule: AdamW-style decay on weights only, linear warm-up
then linear decay to 0 over the run's optimizer steps (stepped every step, not every epoch), and the fused
update where the optimizer has one."""

from __future__ import annotations

import inspect
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
    may_fuse: bool = True,
) -> dict[str, Any]:
    """Lightning's ``configure_optimizers`` answer for the trainable ``named_parameters``; ``may_fuse`` is false
    where the fused update cannot run (mixed precision clips gradients the fused step would unscale itself)."""
    decay, no_decay = [], []
    for name, param in named_parameters:
        if param.requires_grad:
            (no_decay if name.endswith(NO_DECAY) else decay).append(param)
    fused = fused_default(factory, decay + no_decay) if may_fuse else {}
    optimizer = factory(params=[{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], **fused)
    warmup = int(warmup_ratio * total_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def fused_default(factory: Callable[..., torch.optim.Optimizer], params: list[nn.Parameter]) -> dict[str, bool]:
    """``{"fused": True}`` for an optimizer that takes ``fused`` and was given neither it nor ``foreach``, over
    plain floating-point parameters on the CPU or CUDA; else ``{}``.

    Off CUDA, torch's default is its per-tensor loop: an AdamW step over the 81M parameters of the causal-LM
    student took 0.90 s that way and 0.19 s fused on 2 busy CPU cores, the same update. Hugging Face's Trainer
    defaults to fused AdamW too. Parameter subclasses (DTensor, quantized weights) keep torch's default."""
    chosen = getattr(factory, "keywords", {})
    optimizer = getattr(factory, "func", factory)
    if "fused" in chosen or "foreach" in chosen or "fused" not in inspect.signature(optimizer).parameters:
        return {}
    plain = all(
        type(param.data) is torch.Tensor and param.is_floating_point() and param.device.type in ("cpu", "cuda")
        for param in params
    )
    devices = {param.device.type for param in params}
    return {"fused": True} if params and plain and len(devices) == 1 else {}
