"""Quantization-aware training (int8) of the student's Linear layers, built on torchao's QAT API.

In ``setup`` (before any checkpoint restore or optimizer exists) the targeted ``nn.Linear``
layers become torchao ``FakeQuantizedLinear``: same parameter objects, same state-dict keys, so
optimizers, masks and checkpoints carry over. Weights are fake-quantized symmetric per output
channel (zero stays exactly zero, so pruning masks survive), activations per token, dynamically.
Fake quantization is switched on at ``start_step``; nothing is converted during fit (that broke
Lightning's old QAT callback): :func:`convert_to_int8` makes the real int8 model at export.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerAxis, quantize_
from torchao.quantization.qat import FakeQuantizedLinear, IntxFakeQuantizeConfig, QATConfig

from distill.callbacks.masking import DEFAULT_INCLUDE, resolve_targets

log = logging.getLogger(__name__)


def int8_qat_config(weight_bits: int = 8) -> QATConfig:
    """Symmetric per-channel weights, asymmetric per-token dynamic int8 activations."""
    weight_dtype = {8: torch.int8, 4: torch.int4}.get(weight_bits)
    if weight_dtype is None:
        raise ValueError(f"weight_bits={weight_bits!r} must be 8 or 4")
    return QATConfig(
        activation_config=IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
        weight_config=IntxFakeQuantizeConfig(weight_dtype, "per_channel", is_symmetric=True),
        step="prepare",
    )


def int8_base_config(weight_bits: int = 8) -> Int8DynamicActivationIntxWeightConfig:
    """The post-training config that QAT simulates, for the conversion at export."""
    return Int8DynamicActivationIntxWeightConfig(
        weight_dtype={8: torch.int8, 4: torch.int4}[weight_bits], weight_granularity=PerAxis(0)
    )


def fake_quantized_layers(model: nn.Module) -> dict[str, FakeQuantizedLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, FakeQuantizedLinear)}


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    for layer in fake_quantized_layers(model).values():
        for quantizer in (layer.weight_fake_quantizer, layer.activation_fake_quantizer):
            if quantizer is not None:
                quantizer.enabled = enabled


def convert_to_int8(model: nn.Module, weight_bits: int = 8, include: Sequence[str] | None = None) -> nn.Module:
    """A converted copy: fake-quantized layers (or, for a float model, the ``include`` Linears) in int8."""
    converted = copy.deepcopy(model).cpu().eval()
    if fake_quantized_layers(converted):
        quantize_(converted, QATConfig(int8_base_config(weight_bits), step="convert"))
    else:
        names = {name.removesuffix(".weight") for name in resolve_targets(converted, include or ["*"])}
        quantize_(converted, int8_base_config(weight_bits), filter_fn=lambda module, fqn: fqn in names)
    return converted


class QuantizationAwareTraining(pl.Callback):
    """Fake-quantize the targeted Linear layers from ``start_step`` to the end of fit."""

    def __init__(
        self, start_step: int = 0, weight_bits: int = 8, include: Sequence[str] = DEFAULT_INCLUDE, exclude=()
    ) -> None:
        if start_step < 0:
            raise ValueError(f"start_step={start_step!r} must be >= 0")
        self.config = int8_qat_config(weight_bits)
        self.start_step, self.weight_bits = start_step, weight_bits
        self.include, self.exclude = list(include), list(exclude)
        self.active = False
        self.layers: list[str] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        names = {name.removesuffix(".weight") for name in resolve_targets(pl_module, self.include, self.exclude)}
        fresh = [name for name in names if not isinstance(pl_module.get_submodule(name), FakeQuantizedLinear)]
        if fresh:
            quantize_(pl_module, self.config, filter_fn=lambda module, fqn: fqn in fresh)
            log.info(
                "QAT: %d Linear layers fake-quantized (int%d weights, int8 activations)", len(fresh), self.weight_bits
            )
        self.layers = sorted(fake_quantized_layers(pl_module))
        set_fake_quant(pl_module, self.active)

    def complete(self, global_step: int) -> bool:
        """Whether fake quantization is on: switched on at ``start_step`` and trained through."""
        return global_step > self.start_step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        if not self.active and trainer.global_step >= self.start_step:
            self.active = True
            set_fake_quant(pl_module, True)
            log.info("QAT: fake quantization on from step %d", trainer.global_step)

    def describe(self) -> dict[str, Any]:
        """For the export manifest."""
        return {
            "weights": f"int{self.weight_bits} symmetric per output channel",
            "activations": "int8 asymmetric per token, dynamic",
            "start_step": self.start_step,
            "layers": self.layers,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"active": self.active, "start_step": self.start_step, "weight_bits": self.weight_bits}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["weight_bits"] != self.weight_bits:
            raise ValueError(
                f"checkpoint was trained with int{state_dict['weight_bits']} QAT, not int{self.weight_bits}"
            )
        self.active = state_dict["active"]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        set_fake_quant(pl_module, self.active)  # restored state (resume) is put back in force
