"""QuantizationAwareTraining: torchao fake quantization from start_step, zeros kept, int8 conversion."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from distill.callbacks.nm_sparsity import NMSparsity
from distill.callbacks.qat import QuantizationAwareTraining, convert_to_int8, fake_quantized_layers
from distill.compression_report import compression_report
from distill.modules.distillation import DistillationModule
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


def test_int8_conversion_matches_fake_quantization(tmp_path: Path) -> None:
    module = tiny_module()
    make_trainer(tmp_path, [QuantizationAwareTraining(include=[ENCODER])], 2).fit(module, train_dataloaders=batches())
    student = module.student.eval()
    inputs = next(iter(batches()))
    inputs.pop("labels")
    int8 = convert_to_int8(student)
    assert not fake_quantized_layers(int8) and all(
        hasattr(layer.weight, "qdata")
        for name, layer in int8.named_modules()
        if ".encoder.layer." in f".{name}" and isinstance(layer, torch.nn.Linear)
    )
    with torch.no_grad():
        assert torch.allclose(int8(**inputs).logits, student(**inputs).logits, atol=1e-5)


def test_weight_bits_are_checked() -> None:
    with pytest.raises(ValueError, match="weight_bits=3 must be 8 or 4"):
        QuantizationAwareTraining(weight_bits=3)
    callback = QuantizationAwareTraining()
    with pytest.raises(ValueError, match="trained with int4 QAT, not int8"):
        callback.load_state_dict({"active": True, "start_step": 0, "weight_bits": 4})
