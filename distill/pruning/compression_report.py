"""How compressed a student is: per Linear layer and in total, against its teacher.

Sizes are the bytes a deployed copy would take, tensor by tensor:

* dense: ``params * bits / 8`` (32 bits, or 8 for a QAT-fake-quantized layer, plus one
  fp32 scale per output channel);
* 2:4-compressed (every group of 4 input weights holds <= 2 non-zeros): half the values plus
  2 bits of position metadata per kept value, the layout cuSPARSELt/CUTLASS store;
* other sparse weights: a bitmap (1 bit per entry) plus the non-zero values.

``size_bytes`` takes the smallest layout each weight qualifies for. Everything that is not a
Linear-like weight (embeddings, LayerNorms, biases) counts dense at its own dtype. Weights are read as
``[out, in]`` (``linear_weight``), so GPT-2's transposed ``Conv1D`` is grouped along its inputs too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from distill.architectures.linears import is_linear, linear_weight
from distill.kernels.sparsity import is_nm_sparse


@dataclass
class LayerReport:
    name: str
    params: int
    nonzero: int
    sparsity: float
    nm24_valid: bool
    bits: int
    dense_bytes: int
    nm24_bytes: int | None
    int8_bytes: int
    size_bytes: int


def weight_bits(module: nn.Module) -> int:
    """Bits per weight once deployed: from an active QAT fake-quantizer, else the dtype's."""
    quantizer = getattr(module, "weight_fake_quantizer", None)
    if quantizer is not None and getattr(quantizer, "enabled", False):
        return quantizer.bits
    return module.weight.element_size() * 8


def layer_report(name: str, module: nn.Module) -> LayerReport:
    weight = linear_weight(module).detach()
    params, nonzero = weight.numel(), int(torch.count_nonzero(weight))
    bits = weight_bits(module)
    scale_bytes = weight.shape[0] * 4 if bits < 16 else 0
    nm24_valid = weight.shape[1] % 4 == 0 and is_nm_sparse(weight, 2, 4)
    nm24_bytes = params // 2 * bits // 8 + params // 8 + scale_bytes if nm24_valid else None
    dense_bytes = params * bits // 8 + scale_bytes
    bitmap_bytes = nonzero * bits // 8 + (params + 7) // 8 + scale_bytes
    return LayerReport(
        name=name,
        params=params,
        nonzero=nonzero,
        sparsity=1.0 - nonzero / params,
        nm24_valid=nm24_valid,
        bits=bits,
        dense_bytes=dense_bytes,
        nm24_bytes=nm24_bytes,
        int8_bytes=params + weight.shape[0] * 4,
        size_bytes=min(b for b in (dense_bytes, nm24_bytes, bitmap_bytes) if b is not None),
    )


def other_bytes(model: nn.Module, linear_weights: set[int]) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in linear_weights)


def compression_report(student: nn.Module, teacher: nn.Module | None = None) -> tuple[list[LayerReport], dict]:
    """Per-layer rows for every Linear-like layer of the student, and totals (with teacher ratios when given)."""
    linears = {name: module for name, module in student.named_modules() if is_linear(module)}
    layers = [layer_report(name, module) for name, module in linears.items()]
    rest = other_bytes(student, {id(module.weight) for module in linears.values()})
    params = sum(p.numel() for p in student.parameters())
    pruned = sum(layer.params - layer.nonzero for layer in layers)
    linear_params = sum(layer.params for layer in layers)
    totals = {
        "params": params,
        "nonzero_params": params - pruned,
        "linear_sparsity": pruned / max(linear_params, 1),
        "nm24_valid_layers": sum(layer.nm24_valid for layer in layers),
        "quantized_layers": sum(layer.bits < 16 for layer in layers),
        "dense_bytes": rest + sum(layer.params * 4 for layer in layers),
        "size_bytes": rest + sum(layer.size_bytes for layer in layers),
    }
    if teacher is not None:
        teacher_params = sum(p.numel() for p in teacher.parameters())
        teacher_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
        totals |= {
            "teacher_params": teacher_params,
            "teacher_size_bytes": teacher_bytes,
            "param_ratio": teacher_params / params,
            "nonzero_ratio": teacher_params / totals["nonzero_params"],
            "size_ratio": teacher_bytes / totals["size_bytes"],
        }
    return layers, totals


def report_rows(layers: list[LayerReport]) -> tuple[list[str], list[list]]:
    """Columns and rows, for a W&B table or a JSON file."""
    columns = list(asdict(layers[0])) if layers else []
    return columns, [list(asdict(layer).values()) for layer in layers]
