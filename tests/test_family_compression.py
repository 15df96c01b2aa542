"""The compression callbacks and the one-shot pruner on every causal-LM family, GPT-2's transposed Conv1D included."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torchao.quantization.qat import FakeQuantizedLinear
from transformers.pytorch_utils import Conv1D

from distill.architectures.linears import block_stack, in_features, is_linear, linear_weight, out_features
from distill.callbacks import nm_sparsity
from distill.callbacks.masking import resolve_targets
from distill.callbacks.nm_sparsity import NMSparsity
from distill.callbacks.qat import (
    ActivationFakeQuantizer,
    FakeQuantizedConv1D,
    QuantizationAwareTraining,
    WeightFakeQuantizer,
    fake_quantized_layers,
    plain_layer,
    set_fake_quant,
)
from distill.kernels.sparsity import is_nm_sparse
from distill.pruning.compression_report import compression_report
from distill.pruning.oneshot.sequential import OneShotSettings, prune_oneshot
from distill.pruning.oneshot.solvers import SparsityTarget
from tests.model_families import FAMILIES, VOCAB, tiny_causal_lm

GPT2_BLOCK = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class Holder(nn.Module):
    """What the callbacks see: a LightningModule whose ``student`` is the model."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student


def set_up(callback, model: nn.Module) -> Holder:
    holder = Holder(model)
    callback.setup(SimpleNamespace(callbacks=[callback]), holder, "fit")
    return holder


def batches() -> list[dict[str, torch.Tensor]]:
    input_ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}]


def groups_of_four_keep_two(keep: torch.Tensor) -> bool:
    """``keep`` is ``[out, in]``: every 4 consecutive inputs of a row hold exactly 2 kept entries."""
    return bool((keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_default_targets_are_the_linear_like_layers_of_the_block_stack(family: str) -> None:
    model = tiny_causal_lm(family, layers=2)
    stack_name, _ = block_stack(model)
    expected = [
        f"student.{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and name.startswith(f"{stack_name}.")
    ]
    targets = resolve_targets(Holder(model), None)
    assert targets == expected and len(targets) >= 8
    assert not any("lm_head" in name or "embed" in name or name.endswith("wte.weight") for name in targets)


def test_gpt2_default_targets_are_its_four_conv1d_per_block() -> None:
    targets = resolve_targets(Holder(tiny_causal_lm("gpt2", layers=2)), None)
    assert targets == [f"student.transformer.h.{block}.{layer}.weight" for block in range(2) for layer in GPT2_BLOCK]


def test_an_explicit_include_still_selects_and_names_what_matches_nothing() -> None:
    holder = Holder(tiny_causal_lm("gpt2", layers=2))
    assert resolve_targets(holder, ["student.*mlp.c_fc"]) == [
        f"student.transformer.h.{i}.mlp.c_fc.weight" for i in (0, 1)
    ]
    with pytest.raises(ValueError, match=r"'student.\*q_proj' matches no Linear layer"):
        resolve_targets(holder, ["student.*q_proj"])


def test_linear_weight_of_conv1d_is_a_writable_out_in_view() -> None:
    layer = Conv1D(12, 8)  # 8 inputs, 12 outputs, stored [8, 12]
    view = linear_weight(layer)
    assert view.shape == (12, 8) and (out_features(layer), in_features(layer)) == (12, 8) and is_linear(layer)
    with torch.no_grad():
        view[3, 5] = 7.0
    assert layer.weight[5, 3] == 7.0


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_nm_masks_run_along_the_input_dimension_in_the_parameters_layout(family: str) -> None:
    callback = NMSparsity(backend="native")
    holder = set_up(callback, tiny_causal_lm(family, layers=2))
    masks = callback._native_masks(holder)
    assert sorted(masks) == sorted(callback.targets) and len(masks) >= 8
    for name, mask in masks.items():
        layer = holder.get_submodule(name.removesuffix(".weight"))
        assert mask.shape == layer.weight.shape
        # Conv1D stores [in, out]: its input dimension is the mask's first.
        assert groups_of_four_keep_two(mask.T if isinstance(layer, Conv1D) else mask)
    callback.masks = masks
    callback.apply_masks(holder)
    for name in masks:
        assert is_nm_sparse(linear_weight(holder.get_submodule(name.removesuffix(".weight"))))


def test_apex_is_kept_for_linear_models_and_refused_for_conv1d(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nm_sparsity, "load_asp", lambda: object())
    monkeypatch.setattr(nm_sparsity, "cuda_available", lambda: True)
    auto = NMSparsity(backend="auto")
    set_up(auto, tiny_causal_lm("gpt2", layers=2))
    assert auto.backend == "native"
    llama = NMSparsity(backend="auto")
    set_up(llama, tiny_causal_lm("llama", layers=2))
    assert llama.backend == "apex"
    with pytest.raises(ValueError, match=r"backend='apex' cannot mask \['student.transformer.h.0.attn.c_attn.weight'"):
        set_up(NMSparsity(backend="apex"), tiny_causal_lm("gpt2", layers=2))


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_oneshot_2_4_on_gpt2_is_exact_along_the_input_dimension(method: str) -> None:
    model, dense = tiny_causal_lm("gpt2", layers=2), tiny_causal_lm("gpt2", layers=2)
    masks = prune_oneshot(model, batches(), OneShotSettings(method, SparsityTarget(n=2, m=4), block_size=16))
    assert sorted(masks) == sorted(f"transformer.h.{b}.{layer}.weight" for b in range(2) for layer in GPT2_BLOCK)
    for name, keep in masks.items():
        layer = model.get_submodule(name.removesuffix(".weight"))
        assert keep.shape == layer.weight.shape and groups_of_four_keep_two(keep.T)
        assert is_nm_sparse(linear_weight(layer)) and not layer.weight[~keep].any()
    assert not torch.equal(model.transformer.h[0].attn.c_attn.weight, dense.transformer.h[0].attn.c_attn.weight)
    assert torch.equal(model.lm_head.weight, dense.lm_head.weight)
    with torch.no_grad():
        assert torch.isfinite(model(**batches()[0]).logits).all()
    _, totals = compression_report(model)
    assert totals["nm24_valid_layers"] == len(masks)


def fake_linear_of(conv: Conv1D) -> FakeQuantizedLinear:
    linear = FakeQuantizedLinear(conv.nx, conv.nf, bias=True)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    linear.weight_fake_quantizer, linear.activation_fake_quantizer = WeightFakeQuantizer(), ActivationFakeQuantizer()
    return linear


def test_fake_quantized_conv1d_matches_the_fake_quantized_linear_of_its_transposed_weight() -> None:
    torch.manual_seed(0)
    conv = Conv1D(24, 16)
    nn.init.normal_(conv.bias)
    fake, linear = FakeQuantizedConv1D(conv), fake_linear_of(conv)
    x = torch.randn(3, 5, 16)
    assert fake.weight is conv.weight and list(fake.state_dict()) == list(conv.state_dict())
    quantized = fake(x)
    torch.testing.assert_close(quantized, linear(x), rtol=0, atol=1e-6)
    for quantizer in (fake.weight_fake_quantizer, fake.activation_fake_quantizer):
        quantizer.enabled = False
    assert torch.equal(fake(x), conv(x)) and not torch.equal(quantized, conv(x))
    plain = plain_layer(fake)
    assert type(plain) is Conv1D and plain.weight is conv.weight and plain.bias is conv.bias


def test_qat_fake_quantizes_gpt2s_conv1d_and_the_model_runs() -> None:
    callback = QuantizationAwareTraining()
    holder = set_up(callback, tiny_causal_lm("gpt2", layers=2))
    layers = fake_quantized_layers(holder)
    assert len(layers) == 8 and all(isinstance(layer, FakeQuantizedConv1D) for layer in layers.values())
    set_fake_quant(holder, True)
    with torch.no_grad():
        assert torch.isfinite(holder.student(**batches()[0]).logits).all()
    assert compression_report(holder.student)[1]["quantized_layers"] == 8
