"""Quantization-aware training (int8) of the student's Linear layers, in the arithmetic the deployed model runs.

In ``setup`` (before any checkpoint restore or optimizer exists) the targeted ``nn.Linear`` layers become
torchao ``FakeQuantizedLinear`` containers, and GPT-2's ``Conv1D`` layers :class:`FakeQuantizedConv1D` ones
(same parameter objects, same state-dict keys, so optimizers, masks and checkpoints carry over), holding the
two quantizers below. They simulate ONNX Runtime's dynamic int8 MatMul,
which is what ``distill.serve.onnx_int8`` exports and serves: weights int8 symmetric per output channel in
[-127, 127] with scale max|w|/127 (zero stays zero, so pruning masks survive); activations uint8 per tensor, at
every call, over a range that always contains 0 (``DynamicQuantizeLinear``). Both round half to even, as ORT
does, and pass gradients straight through. So the fake-quant accuracy of fit is the deployed accuracy, up to
float summation order. Fake quantization is switched on at ``start_step``; nothing is converted during fit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torchao.quantization.qat import FakeQuantizedLinear
from transformers.pytorch_utils import Conv1D

from distill.architectures.linears import is_transposed
from distill.callbacks.compression import CompressionCallback
from distill.callbacks.masking import resolve_targets

log = logging.getLogger(__name__)


def _straight_through(value: torch.Tensor, simulated: torch.Tensor) -> torch.Tensor:
    return value + (simulated.to(value.dtype) - value).detach()


class WeightFakeQuantizer(nn.Module):
    """Int8 symmetric per output channel, as ORT's quantizer stores a MatMul's constant weight."""

    bits = 8

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        # ORT computes the scale in float64 (2·absmax / 254) and stores it as float32; an all-zero row gets 1.
        scale = (weight.detach().abs().amax(dim=1, keepdim=True).double() * 2 / 254).float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        quantized = torch.clamp(torch.round(weight.float() / scale), -127, 127) * scale
        return _straight_through(weight, quantized)


class ActivationFakeQuantizer(nn.Module):
    """Uint8 asymmetric per tensor, computed at every call, as ORT's ``DynamicQuantizeLinear``."""

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return inputs
        values = inputs.detach().float()
        low, high = values.min().clamp(max=0), values.max().clamp(min=0)
        scale = (high - low) / 255
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_point = torch.clamp(torch.round(-low / scale), 0, 255)
        quantized = torch.clamp(torch.round(inputs.float() / scale) + zero_point, 0, 255)
        return _straight_through(inputs, (quantized - zero_point) * scale)


class FakeQuantizedConv1D(Conv1D):
    """A ``Conv1D`` (weight stored ``[in, out]``) with the quantizers a ``FakeQuantizedLinear`` holds, applied to
    the same ``[out, in]`` matrix, so both simulate the same int8 layer. Quantizers off, it is ``Conv1D``."""

    def __init__(self, layer: Conv1D) -> None:
        with torch.device("meta"):  # the parameters are the plain layer's own, not new ones
            super().__init__(layer.nf, layer.nx)
        self.weight, self.bias = layer.weight, layer.bias
        self.weight_fake_quantizer = WeightFakeQuantizer()
        self.activation_fake_quantizer = ActivationFakeQuantizer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_fake_quantizer(self.weight.T).T  # per output channel: rows of the [out, in] view
        x = self.activation_fake_quantizer(x)
        output = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), weight)
        return output.view(*x.shape[:-1], self.nf)

    def to_plain(self) -> Conv1D:
        with torch.device("meta"):
            plain = Conv1D(self.nf, self.nx)
        plain.weight, plain.bias = self.weight, self.bias
        return plain


FAKE_QUANTIZED = (FakeQuantizedLinear, FakeQuantizedConv1D)


def fake_quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if isinstance(module, FAKE_QUANTIZED)}


def plain_layer(layer: nn.Module) -> nn.Module:
    """A fake-quantized layer turned back into the model's own ``nn.Linear`` or ``Conv1D``, same parameters."""
    return layer.to_plain() if isinstance(layer, FakeQuantizedConv1D) else layer.to_linear()


def _fake_quantized(layer: nn.Module) -> nn.Module:
    if is_transposed(layer):
        return FakeQuantizedConv1D(layer)
    fake = FakeQuantizedLinear(layer.in_features, layer.out_features, layer.bias is not None, device="meta")
    fake.weight, fake.bias = layer.weight, layer.bias
    fake.weight_fake_quantizer, fake.activation_fake_quantizer = WeightFakeQuantizer(), ActivationFakeQuantizer()
    return fake


def fake_quantize(model: nn.Module, names: Sequence[str]) -> None:
    """Swap the named Linear-like layers for fake-quantized ones sharing their parameters."""
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, _fake_quantized(model.get_submodule(name)))


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    for layer in fake_quantized_layers(model).values():
        for quantizer in (layer.weight_fake_quantizer, layer.activation_fake_quantizer):
            if quantizer is not None:
                quantizer.enabled = enabled


class QuantizationAwareTraining(CompressionCallback):
    """Fake-quantize the targeted Linear layers from ``start_step`` to the end of fit."""

    def __init__(self, start_step: int = 0, include: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> None:
        if start_step < 0:
            raise ValueError(f"start_step={start_step!r} must be >= 0")
        self.start_step = start_step
        # include=None: the Linear-like layers of the student's block stack (masking.default_include).
        self.include = None if include is None else list(include)
        self.exclude = list(exclude)
        self.active = False
        self.layers: list[str] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        names = {name.removesuffix(".weight") for name in resolve_targets(pl_module, self.include, self.exclude)}
        fresh = sorted(name for name in names if not isinstance(pl_module.get_submodule(name), FAKE_QUANTIZED))
        if fresh:
            fake_quantize(pl_module, fresh)
            log.info("QAT: %d Linear layers fake-quantized (int8 weights, uint8 dynamic activations)", len(fresh))
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
            "weights": "int8 symmetric per output channel, [-127, 127]",
            "activations": "uint8 asymmetric per tensor, dynamic (ONNX Runtime DynamicQuantizeLinear)",
            "start_step": self.start_step,
            "layers": self.layers,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"active": self.active, "start_step": self.start_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.active = state_dict["active"]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        set_fake_quant(pl_module, self.active)  # restored state (resume) is put back in force
