"""QuantizationAwareTraining: fake quantization from start_step, zeros kept, ONNX Runtime's arithmetic exactly."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from onnxruntime.quantization.quant_utils import quantize_data

from distill.callbacks.nm_sparsity import NMSparsity
from distill.callbacks.qat import (
    ActivationFakeQuantizer,
    QuantizationAwareTraining,
    WeightFakeQuantizer,
    fake_quantized_layers,
)
from distill.modules.distillation import DistillationModule
from distill.pruning.compression_report import compression_report
from tests.callback_helpers import ENCODER, batches, make_trainer, tiny_module


class QuantWatch(pl.Callback):
    def __init__(self) -> None:
        self.enabled: list[bool] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        layers = fake_quantized_layers(module.student).values()
        states = {layer.weight_fake_quantizer.enabled and layer.activation_fake_quantizer.enabled for layer in layers}
        assert len(states) == 1
        self.enabled.append(states.pop())


def test_fake_quant_starts_at_start_step_and_keeps_keys(tmp_path: Path) -> None:
    module, watch = tiny_module(), QuantWatch()
    keys_before = set(module.student.state_dict())
    trainer = make_trainer(tmp_path, [QuantizationAwareTraining(start_step=2, include=[ENCODER]), watch], 4)
    trainer.fit(module, train_dataloaders=batches(16))
    assert watch.enabled == [False, False, True, True]
    assert len(fake_quantized_layers(module.student)) == 12
    assert set(module.student.state_dict()) == keys_before
    trainer.save_checkpoint(tmp_path / "qat.ckpt")
    plain = DistillationModule.load_student(str(tmp_path / "qat.ckpt"))
    assert not fake_quantized_layers(plain)


def test_symmetric_weights_keep_2_4_zeros_exactly(tmp_path: Path) -> None:
    module = tiny_module()
    sparsity = NMSparsity(backend="native", include=[ENCODER])
    trainer = make_trainer(tmp_path, [QuantizationAwareTraining(include=[ENCODER]), sparsity], 4)
    trainer.fit(module, train_dataloaders=batches(16))
    for name, layer in fake_quantized_layers(module).items():
        quantized = layer.weight_fake_quantizer(layer.weight)
        mask = sparsity.masks[f"{name}.weight"]
        assert not quantized[~mask].any() and quantized[mask].count_nonzero() > 0.9 * mask.sum()
    _, totals = compression_report(module.student)
    assert totals["nm24_valid_layers"] == 12 and totals["quantized_layers"] == 12


def _run_onnx_graph(nodes: list, inputs: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
    graph = helper.make_graph(
        nodes,
        "reference",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, value.shape) for name, value in inputs.items()],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(outputs, inputs)


@pytest.mark.parametrize("shift", [0.0, 3.0, -3.0], ids=["straddles-zero", "all-positive", "all-negative"])
def test_activation_fake_quantizer_is_onnx_runtimes_dynamic_quantize_linear(shift: float) -> None:
    values = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0)) + shift
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "scale", "zero_point"]),
        helper.make_node("DequantizeLinear", ["q", "scale", "zero_point"], ["y"]),
    ]
    (expected,) = _run_onnx_graph(nodes, {"x": values.numpy()}, ["y"])
    torch.testing.assert_close(ActivationFakeQuantizer()(values), torch.from_numpy(expected), rtol=0, atol=1e-6)


def _ort_dequantized(channel: torch.Tensor) -> torch.Tensor:
    """ORT's own weight quantization of one output channel, de-quantized."""
    zero_point, scale, quantized = quantize_data(channel.numpy(), TensorProto.INT8, symmetric=True)
    return torch.from_numpy((quantized.astype(np.float32) - np.float32(zero_point)) * np.float32(scale))


def test_weight_fake_quantizer_is_onnx_runtimes_per_channel_int8() -> None:
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    weight[2] = 0  # an all-zero channel (pruned away) stays zero
    weight[:, ::4] = 0
    simulated = WeightFakeQuantizer()(weight)
    torch.testing.assert_close(simulated, torch.stack([_ort_dequantized(row) for row in weight]), rtol=0, atol=0)
    assert not simulated[weight == 0].any()


def test_switched_off_quantizers_are_the_identity() -> None:
    values = torch.randn(4, 16)
    for quantizer in (WeightFakeQuantizer(), ActivationFakeQuantizer()):
        quantizer.enabled = False
        assert quantizer(values) is values
