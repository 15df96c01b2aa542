"""2:4 semi-structured export: eligibility on CPU, the per-layer decision, and CUDA parity when present."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from distill.kernels.sparsity import nm_mask
from distill.serve import semi_structured
from distill.serve.semi_structured import convert_layer, ineligibility, to_semi_structured


def sparse_linear(dtype=torch.float16, device="cpu", shape=(64, 128)) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(shape[1], shape[0]).to(device=device, dtype=dtype)
    with torch.no_grad():
        layer.weight.mul_(nm_mask(layer.weight))
    return layer


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: nn.Linear(128, 64).half().weight, "not 2:4 sparse"),
        (lambda: sparse_linear(torch.float32).weight, "dtype torch.float32"),
        (lambda: sparse_linear(shape=(24, 128)).weight, r"shape \(24, 128\)"),
        (lambda: sparse_linear().weight, "needs CUDA"),
    ],
)
def test_ineligible_weights_say_why(make, reason: str) -> None:
    with torch.no_grad():
        assert re.search(reason, ineligibility(make()))


def fake_conversion(monkeypatch: pytest.MonkeyPatch, sparse_ms: float) -> None:
    """CPU stand-ins: eligibility passes, 'conversion' keeps the dense values, timings are given."""
    monkeypatch.setattr(semi_structured, "ineligibility", lambda weight: None)
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", lambda weight: weight.detach().clone())
    timings = iter([1.0, sparse_ms])
    return lambda fn: next(timings)


def test_a_faster_sparse_layer_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = sparse_linear(torch.float32)
    dense = layer.weight
    decision = convert_layer("fc", layer, tokens=8, timer=fake_conversion(monkeypatch, sparse_ms=0.5))
    assert decision.converted and layer.weight is not dense


def test_a_slower_sparse_layer_stays_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = sparse_linear(torch.float32)
    dense = layer.weight
    decision = convert_layer("fc", layer, tokens=8, timer=fake_conversion(monkeypatch, sparse_ms=2.0))
    assert not decision.converted and decision.reason == "sparse is not faster" and layer.weight is dense


def test_cpu_models_are_left_dense() -> None:
    model = nn.Sequential(sparse_linear(), nn.ReLU(), sparse_linear(shape=(128, 64)))
    decisions = to_semi_structured(model, tokens=8)
    assert [d.converted for d in decisions] == [False, False]
    assert all("needs CUDA" in d.reason for d in decisions)


@pytest.mark.parametrize(("timing", "converted"), [("eager", False), ("graph", True)])
def test_timing_picks_what_faster_means(monkeypatch: pytest.MonkeyPatch, timing: str, converted: bool) -> None:
    """torch 2.11's 2:4 path on an H100: slower eagerly (a plan per call), faster in GPU time."""
    fake_conversion(monkeypatch, sparse_ms=0.0)
    eager, graph = iter([1.0, 2.0]), iter([1.0, 0.5])
    monkeypatch.setattr(semi_structured, "cuda_time_ms", lambda fn: next(eager))
    monkeypatch.setattr(semi_structured, "graph_time_ms", lambda fn: next(graph))
    decisions = to_semi_structured(nn.Sequential(sparse_linear(torch.float32)), tokens=8, timing=timing)
    assert [d.converted for d in decisions] == [converted]


def test_timing_none_converts_every_exact_layer_unmeasured(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_conversion(monkeypatch, sparse_ms=0.0)
    never = lambda fn: pytest.fail("timing='none' must not time")  # noqa: E731
    monkeypatch.setattr(semi_structured, "cuda_time_ms", never)
    monkeypatch.setattr(semi_structured, "graph_time_ms", never)
    decisions = to_semi_structured(nn.Sequential(sparse_linear(torch.float32)), tokens=8, timing="none")
    assert [(d.converted, d.dense_ms, d.sparse_ms) for d in decisions] == [(True, None, None)]


def test_an_unknown_timing_is_named_and_changes_nothing() -> None:
    model = nn.Sequential(sparse_linear())
    weight = model[0].weight
    with pytest.raises(ValueError, match=r"timing='wall'; expected one of 'eager', 'graph'"):
        to_semi_structured(model, timing="wall")
    assert model[0].weight is weight


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0), reason="needs an sm80+ GPU"
)
@pytest.mark.parametrize("timer", [semi_structured.cuda_time_ms, semi_structured.graph_time_ms])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_semi_structured_layers_match_dense(dtype: torch.dtype, timer) -> None:
    layer = sparse_linear(dtype, "cuda", shape=(3072, 768))
    inputs = torch.randn(4096, 768, device="cuda", dtype=dtype)
    with torch.inference_mode():
        expected = layer(inputs)
        decision = convert_layer("fc", layer, tokens=4096, timer=timer)
        assert decision.dense_ms > 0
        assert torch.allclose(layer(inputs), expected, rtol=1e-2, atol=1e-2), decision
