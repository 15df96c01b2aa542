"""u8u8 serving: the rewritten graph computes the int8 graph's integer products exactly, whatever the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from distill.serve import int8_arithmetic
from distill.serve.int8_arithmetic import as_u8u8, servable_graph
from distill.serve.int8_arithmetic import int8_arithmetic as chosen_arithmetic


def integer_matmuls(weight: np.ndarray, zero_point: np.ndarray | None, shared_by: int = 1) -> onnx.ModelProto:
    """``shared_by`` MatMulInteger nodes of one uint8 input and one int8 weight, with or without its zero point."""
    initializers = [numpy_helper.from_array(weight, "weight")]
    zero_point_inputs = []
    if zero_point is not None:
        initializers.append(numpy_helper.from_array(zero_point, "weight_zero_point"))
        zero_point_inputs = ["", "weight_zero_point"]
    nodes = [
        helper.make_node("MatMulInteger", ["x", "weight", *zero_point_inputs], [f"y{index}"], name=f"matmul{index}")
        for index in range(shared_by)
    ]
    outputs = [helper.make_tensor_value_info(f"y{index}", TensorProto.INT32, None) for index in range(shared_by)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.UINT8, [None, weight.shape[0]])]
    graph = helper.make_graph(nodes, "int8", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


@pytest.mark.parametrize("with_zero_point", [True, False])
def test_u8u8_graph_computes_the_exact_integer_products(with_zero_point: bool) -> None:
    # Extreme values: 255 x -128 pairs are what overflows 16 bits in the saturating u8s8 kernels.
    rng = np.random.default_rng(0)
    weight = rng.integers(-128, 128, size=(64, 8), dtype=np.int8)
    weight[:, 0] = -128
    zero_point = rng.integers(-3, 4, size=8, dtype=np.int8) if with_zero_point else None
    x = rng.integers(0, 256, size=(5, 64), dtype=np.uint8)
    x[:, :] = np.where(rng.random((5, 64)) < 0.5, 255, x)
    model = integer_matmuls(weight, zero_point, shared_by=2)
    assert as_u8u8(model) == 1  # a weight shared by two nodes is shifted once
    expected = x.astype(np.int64) @ (weight.astype(np.int64) - (0 if zero_point is None else zero_point))
    for output in run(model, x):
        np.testing.assert_array_equal(output, expected)
    assert {tensor.data_type for tensor in model.graph.initializer} == {TensorProto.UINT8}


def test_graphs_without_int8_weights_are_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = integer_matmuls(np.ones((4, 2), dtype=np.uint8), None)
    before = model.SerializeToString()
    assert as_u8u8(model) == 0 and model.SerializeToString() == before
    path = tmp_path / "u8.onnx"
    onnx.save(model, str(path))
    monkeypatch.setenv("DISTILL_ORT_INT8", "u8u8")
    assert servable_graph(path) == str(path)
    onnx.save(integer_matmuls(np.ones((4, 2), dtype=np.int8), None), str(path))
    assert isinstance(servable_graph(path), bytes)
    monkeypatch.setenv("DISTILL_ORT_INT8", "u8s8")
    assert servable_graph(path) == str(path)


@pytest.mark.parametrize(
    ("machine", "flags", "expected"),
    [
        ("x86_64", frozenset({"avx2"}), "u8u8"),
        ("x86_64", frozenset({"avx2", "avx512_vnni"}), "u8s8"),
        ("AMD64", frozenset({"avx_vnni"}), "u8s8"),
        ("x86_64", None, "u8u8"),  # flags unknown: the arithmetic that is exact everywhere
        ("aarch64", None, "u8s8"),
    ],
)
def test_auto_picks_u8u8_where_u8s8_kernels_saturate(machine, flags, expected, monkeypatch) -> None:
    monkeypatch.delenv("DISTILL_ORT_INT8", raising=False)
    monkeypatch.setattr(int8_arithmetic.platform, "machine", lambda: machine)
    monkeypatch.setattr(int8_arithmetic, "cpu_flags", lambda: flags)
    assert chosen_arithmetic() == expected
    assert chosen_arithmetic("u8s8") == "u8s8"


def test_a_bad_override_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILL_ORT_INT8", "s8s8")
    with pytest.raises(ValueError, match=r"DISTILL_ORT_INT8='s8s8' must be one of \['auto', 'u8s8', 'u8u8'\]"):
        chosen_arithmetic()
