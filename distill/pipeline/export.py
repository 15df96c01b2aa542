"""Export a trained student: a plain Hugging Face folder, a compression manifest, an int8 copy.

``student/`` is ``save_pretrained`` of the float student with pruned entries as exact zeros
(QAT's fake-quantized layers are turned back into ``nn.Linear`` or ``Conv1D``), so it loads with plain
``AutoModelForSequenceClassification.from_pretrained``. ``student/compression.json`` says what
was compressed. A student trained with QAT is also exported as the int8 model QAT simulated
(``student_int8/``, ONNX Runtime; ``distill.serve.onnx_int8``), whose score, size and latency are
measured here against the float student.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from distill.callbacks.compression import CompressionCallback
from distill.callbacks.qat import fake_quantized_layers, plain_layer
from distill.pruning.compression_report import LayerReport, compression_report
from distill.serve.latency import latency_ms
from distill.serve.onnx_decoder import load_onnx
from distill.serve.onnx_int8 import save_int8
from distill.utils.run_record import write_json

log = logging.getLogger(__name__)


def float_student(student: nn.Module) -> nn.Module:
    """A copy with fake-quantized layers swapped back to ``nn.Linear`` or ``Conv1D`` (same weights)."""
    plain = copy.deepcopy(student).cpu().eval()
    for name, layer in fake_quantized_layers(plain).items():
        parent, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent), child, plain_layer(layer))
    return plain


def manifest(callbacks: list[Any], totals: dict[str, Any]) -> dict[str, Any]:
    """What was compressed and how: each compression callback's ``describe()``, and the report's totals."""
    entries: dict[str, Any] = {"totals": totals}
    for callback in callbacks:
        if isinstance(callback, CompressionCallback):
            entries[type(callback).__name__] = callback.describe()
    return entries


def export_int8(student: nn.Module, float_model: nn.Module, datamodule, output_dir: Path, task) -> dict[str, Any]:
    """Export the int8 model QAT simulated and measure it against the float student (score, bytes, latency)."""
    int8_dir = save_int8(
        float_model,
        sorted(fake_quantized_layers(student)),
        datamodule.tokenizer,
        output_dir / "student_int8",
        functools.partial(task.export_onnx, float_model, datamodule),
    )
    int8, record = load_onnx(int8_dir), json.loads((int8_dir / "quantization.json").read_text())
    results = {
        **{f"student_int8/{name}": value for name, value in task.score(int8, datamodule).items()},
        "student_int8/file_bytes": record["file_bytes"],
        "student_int8/file_bytes_vs_fp32": record["file_bytes"] / record["fp32_file_bytes"],
    }
    for batch_size in task.latency_batch_sizes:
        results[f"student_int8/latency_ms_b{batch_size}"] = latency_ms(int8, datamodule, batch_size, 2, 10)
        results[f"student_fp32/latency_ms_b{batch_size}"] = latency_ms(float_model, datamodule, batch_size, 2, 10)
    return results


def export_student(
    student: nn.Module,
    task,
    datamodule,
    output_dir: Path,
    callbacks: list[Any],
    teacher: nn.Module | None,
    save: bool = True,
) -> tuple[dict[str, Any], list[LayerReport]]:
    """Report compression; with ``save``, write ``student/`` (+ manifest) and, after QAT, the int8 model."""
    layers, totals = compression_report(student, teacher)
    write_json(output_dir / "compression_report.json", {"totals": totals, "layers": [asdict(row) for row in layers]})
    metrics = {f"compression/{key}": value for key, value in totals.items()}
    if save:
        student_dir = output_dir / "student"
        plain = float_student(student)
        plain.save_pretrained(student_dir)
        datamodule.tokenizer.save_pretrained(student_dir)
        write_json(student_dir / "compression.json", manifest(callbacks, totals))
        if fake_quantized_layers(student):
            metrics |= export_int8(student, plain, datamodule, output_dir, task)
        metrics |= task.export_extras(plain, teacher, datamodule, output_dir)
    return metrics, layers
