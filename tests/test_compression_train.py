"""Compression presets end to end on the tiny run: masks held, report written, exports load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from distill.kernels.sparsity import is_nm_sparse
from distill.train import train

pytestmark = pytest.mark.slow

GMP_FAST = [
    "compression.magnitude_pruning.start_step=0",
    "compression.magnitude_pruning.end_step=4",
    "compression.magnitude_pruning.frequency=2",
]


def encoder_linear_weights(model) -> dict[str, torch.Tensor]:
    return {
        name: module.weight
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".encoder.layer." in f".{name}"
    }


def test_nm24_with_qat_exports_exact_2_4_and_int8(compose_train, tiny_run_overrides, tmp_path: Path) -> None:
    metrics = train(compose_train(*tiny_run_overrides, "compression=nm24_qat8"))
    run = tmp_path / "run"
    student = AutoModelForSequenceClassification.from_pretrained(run / "student")
    weights = encoder_linear_weights(student)
    assert len(weights) == 6
    assert all(is_nm_sparse(w, 2, 4) and (w == 0).float().mean() == 0.5 for w in weights.values())
    manifest = json.loads((run / "student" / "compression.json").read_text())
    assert len(manifest["NMSparsity"]["layers"]) == 6 and len(manifest["QuantizationAwareTraining"]["layers"]) == 6
    assert manifest["NMSparsity"]["pattern"] == "2:4"
    assert metrics["compression/nm24_valid_layers"] == 6 and metrics["compression/quantized_layers"] == 6
    assert metrics["student_int8/file_bytes_vs_fp32"] < 1
    assert abs(metrics["student_int8/val_acc"] - metrics["student/val_acc"]) <= 0.2
    quantization = json.loads((run / "student_int8" / "quantization.json").read_text())
    assert (
        sorted(f"student.{name}" for name in quantization["layers"]) == manifest["QuantizationAwareTraining"]["layers"]
    )
    assert len(quantization["nodes"]) == 6 and (run / "student_int8" / "model.onnx").is_file()
    report = json.loads((run / "compression_report.json").read_text())
    assert {row["name"] for row in report["layers"]} >= {name for name in weights}


def test_gmp80_reaches_the_target_in_every_layer(compose_train, tiny_run_overrides, tmp_path: Path) -> None:
    metrics = train(compose_train(*tiny_run_overrides, "compression=gmp80", *GMP_FAST))
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "student")
    for name, weight in encoder_linear_weights(student).items():
        assert (weight == 0).float().mean().item() == pytest.approx(0.8, abs=1e-3), name
    assert metrics["compression/linear_sparsity"] > 0.5
    assert metrics["compression/size_bytes"] < metrics["compression/dense_bytes"]


def test_gmp_and_nm_on_the_same_layers_is_an_error(compose_train, tiny_run_overrides) -> None:
    cfg = compose_train(*tiny_run_overrides, "compression=[gmp80,nm24]", *GMP_FAST)
    with pytest.raises(ValueError, match=r"both target .* set allow_overlap: true on both"):
        train(cfg)
