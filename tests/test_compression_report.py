"""compression_report: counts, N:M validity, bits and bytes per layer and in total."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distill.callbacks.qat import fake_quantize
from distill.kernels.sparsity import nm_mask
from distill.pruning.compression_report import compression_report, layer_report


def linear(out_features: int = 16, in_features: int = 32, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features)


def test_dense_fp32_layer() -> None:
    row = layer_report("fc", linear())
    assert (row.params, row.nonzero, row.sparsity, row.bits) == (512, 512, 0.0, 32)
    assert not row.nm24_valid and row.nm24_bytes is None
    assert row.dense_bytes == row.size_bytes == 512 * 4
    assert row.int8_bytes == 512 + 16 * 4


def test_2_4_layer_counts_half_the_values_plus_metadata() -> None:
    layer = linear()
    with torch.no_grad():
        layer.weight.mul_(nm_mask(layer.weight))
    row = layer_report("fc", layer)
    assert row.nm24_valid and row.sparsity == 0.5
    assert row.nm24_bytes == 256 * 4 + 512 // 8 == row.size_bytes


def test_unstructured_sparsity_uses_a_bitmap() -> None:
    layer = linear()
    with torch.no_grad():
        layer.weight[:, 4:] = 0  # 16 x 4 kept: 87.5 % sparse, rows not 2:4 in the first group
    row = layer_report("fc", layer)
    assert not row.nm24_valid and row.nonzero == 64
    assert row.size_bytes == 64 * 4 + 512 // 8


def test_fake_quantized_layers_count_8_bits() -> None:
    model = nn.Sequential(linear())
    fake_quantize(model, ["0"])
    assert layer_report("0", model[0]).bits == 8
    assert layer_report("0", model[0]).size_bytes == 512 + 16 * 4


def test_totals_and_teacher_ratios() -> None:
    student = nn.Sequential(nn.Embedding(10, 32), linear())
    teacher = nn.Sequential(nn.Embedding(10, 32), linear(), linear(32, 16))
    with torch.no_grad():
        student[1].weight.mul_(nm_mask(student[1].weight))
    layers, totals = compression_report(student, teacher)
    assert [row.name for row in layers] == ["1"]
    assert totals["params"] == 320 + 512 + 16 and totals["nonzero_params"] == 320 + 256 + 16
    assert totals["linear_sparsity"] == 0.5 and totals["nm24_valid_layers"] == 1
    assert totals["size_bytes"] == (320 + 16) * 4 + 256 * 4 + 64
    assert totals["teacher_params"] == 320 + 512 + 16 + 512 + 32
    assert totals["size_ratio"] == pytest.approx(totals["teacher_size_bytes"] / totals["size_bytes"])
