"""Export a trained student: a plain Hugging Face folder, a compression manifest, an int8 copy.

``student/`` is ``save_pretrained`` of the float student with pruned entries as exact zeros
(QAT's fake-quantized layers are turned back into ``nn.Linear``), so it loads with plain
``AutoModelForSequenceClassification.from_pretrained``. ``student/compression.json`` says what
was compressed. A student trained with QAT is also converted to a real int8 model for CPU
(``student_int8.pt``, a torchao state dict) whose accuracy, size and latency are measured here.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchao.quantization import quantize_
from torchao.quantization.qat import QATConfig

from distill.callbacks.qat import convert_to_int8, fake_quantized_layers
from distill.compression_report import LayerReport, compression_report
from distill.eval import latency_ms
from distill.utils.run_record import write_json

log = logging.getLogger(__name__)


def float_student(student: nn.Module) -> nn.Module:
    """A copy with fake-quantized layers swapped back to ``nn.Linear`` (same weights)."""
    plain = copy.deepcopy(student).cpu().eval()
    if fake_quantized_layers(plain):
        quantize_(plain, QATConfig(step="convert"))
    return plain


def manifest(callbacks: list[Any], totals: dict[str, Any]) -> dict[str, Any]:
    """What was compressed and how: each compression callback's ``describe()``, and the report's totals."""
    entries: dict[str, Any] = {"totals": totals}
    for callback in callbacks:
        if hasattr(callback, "describe"):
            entries[type(callback).__name__] = callback.describe()
    return entries


def quantized_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """Bytes of the int8 Linear weights (data, scales, zero points) and of the same weights in fp32."""
    stored = fp32 = 0
    for module in model.modules():
        weight = getattr(module, "weight", None) if isinstance(module, nn.Linear) else None
        if weight is not None and hasattr(weight, "tensor_data_names"):
            stored += sum(
                getattr(weight, name).numel() * getattr(weight, name).element_size()
                for name in weight.tensor_data_names
            )
            fp32 += weight.qdata.numel() * 4
    return stored, fp32


def export_int8(student: nn.Module, float_model: nn.Module, datamodule, output_dir: Path, task) -> dict[str, Any]:
    """Convert, save, and measure the int8 student against its float weights (task score, storage, latency)."""
    int8 = convert_to_int8(student)
    torch.save(int8.state_dict(), output_dir / "student_int8.pt")
    int8_bytes, fp32_bytes = quantized_weight_bytes(int8)
    results = {
        **{f"student_int8/{name}": value for name, value in task.score(int8, datamodule).items()},
        "student_int8/linear_bytes": int8_bytes,
        "student_int8/linear_bytes_vs_fp32": int8_bytes / fp32_bytes,
        "student_int8/file_bytes": (output_dir / "student_int8.pt").stat().st_size,
    }
    for batch_size in task.latency_batch_sizes:
        results[f"student_int8/latency_ms_b{batch_size}"] = latency_ms(int8, datamodule, batch_size, 2, 10)
        results[f"student_fp32/latency_ms_b{batch_size}"] = latency_ms(float_model, datamodule, batch_size, 2, 10)
    return results


def export_student(
    module, datamodule, output_dir: Path, callbacks: list[Any], teacher: nn.Module | None, save: bool = True
) -> tuple[dict[str, Any], list[LayerReport]]:
    """Report compression; with ``save``, write ``student/`` (+ manifest) and, after QAT, the int8 model."""
    layers, totals = compression_report(module.student, teacher)
    write_json(output_dir / "compression_report.json", {"totals": totals, "layers": [asdict(row) for row in layers]})
    metrics = {f"compression/{key}": value for key, value in totals.items()}
    if save:
        student_dir = output_dir / "student"
        plain = float_student(module.student)
        plain.save_pretrained(student_dir)
        datamodule.tokenizer.save_pretrained(student_dir)
        write_json(student_dir / "compression.json", manifest(callbacks, totals))
        if fake_quantized_layers(module.student):
            metrics |= export_int8(module.student, plain, datamodule, output_dir, module.task)
        metrics |= module.task.export_extras(plain, teacher, datamodule, output_dir)
    return metrics, layers
