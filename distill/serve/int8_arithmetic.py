"""Which int8 MatMul arithmetic ONNX Runtime computes exactly on this CPU, and the graph that uses it.

The int8 graphs distill exports multiply uint8 activations by int8 weights (u8s8), the fast form on x86
CPUs with VNNI, whose ``vpdpbusd`` sums the u8 x s8 products in 32 bits. Without VNNI, ORT's u8s8 kernels
use ``vpmaddubsw``, which adds pairs of products in 16 bits and saturates: on a 2-core AVX2 machine the
logits of a tiny QAT BERT moved by 13 % from what QAT simulated (``tests/test_onnx_int8.py``), the caveat
ORT's quantization guide gives with its remedy, u8u8 weights. Adding 128 to every int8 weight and to its
zero point gives uint8 weights with the same integer products, so a served model computes what fit
simulated on every CPU. The file keeps the u8s8 form; :func:`servable_graph` rewrites it when loading.

``DISTILL_ORT_INT8`` (``auto``, ``u8s8`` or ``u8u8``) overrides the choice.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from distill.utils.devices import cpu_flags

log = logging.getLogger(__name__)

OVERRIDE = "DISTILL_ORT_INT8"
ARITHMETICS = ("auto", "u8s8", "u8u8")
# Integer MatMuls whose weight operand can be int8: (weight input, weight zero-point input) by op type.
WEIGHT_INPUTS = {"MatMulInteger": (1, 3), "DynamicQuantizeMatMul": (1, 3), "MatMulIntegerToFloat": (1, 5)}
NON_SATURATING_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}
X86 = {"x86_64", "amd64", "i386", "i686", "x86"}
SHIFT = 128


def saturates_u8s8() -> bool:
    """Whether ORT's u8s8 kernels may saturate here: an x86 CPU without VNNI, or one whose flags are unknown."""
    if platform.machine().lower() not in X86:
        return False
    flags = cpu_flags()
    return flags is None or not flags & NON_SATURATING_FLAGS


def int8_arithmetic(choice: str | None = None) -> str:
    """``u8s8`` or ``u8u8``: ``choice``, else ``$DISTILL_ORT_INT8``, where ``auto`` picks the exact one for this CPU."""
    choice = choice or os.environ.get(OVERRIDE) or "auto"
    if choice not in ARITHMETICS:
        raise ValueError(f"{OVERRIDE}={choice!r} must be one of {list(ARITHMETICS)}")
    if choice == "auto":
        return "u8u8" if saturates_u8s8() else "u8s8"
    return choice


def as_u8u8(model: onnx.ModelProto) -> int:
    """Rewrite ``model`` in place so every int8 weight of an integer MatMul is uint8, shifted with its zero point
    by 128; returns how many weights changed."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    shifted: set[str] = set()
    weights = 0
    for node in model.graph.node:
        inputs = WEIGHT_INPUTS.get(node.op_type)
        weight = initializers.get(node.input[inputs[0]]) if inputs else None
        if weight is None or (weight.data_type != onnx.TensorProto.INT8 and weight.name not in shifted):
            continue
        weights += _shift(weight, shifted)
        _shift(_weight_zero_point(model, node, inputs[1], initializers), shifted)
    return weights


def _weight_zero_point(
    model: onnx.ModelProto, node: onnx.NodeProto, index: int, initializers: dict[str, onnx.TensorProto]
) -> onnx.TensorProto:
    """The node's weight zero point; a node without one (zero for int8) gets 128, the uint8 weights' zero."""
    while len(node.input) <= index:
        node.input.append("")
    if not node.input[index]:
        default = numpy_helper.from_array(np.array(SHIFT, dtype=np.uint8), f"{node.name}_u8u8_zero_point")
        model.graph.initializer.append(default)
        initializers[default.name] = default
        node.input[index] = default.name
    if node.input[index] not in initializers:
        raise ValueError(f"{node.op_type} {node.name!r}: its weight zero point {node.input[index]!r} is not a constant")
    return initializers[node.input[index]]


def _shift(tensor: onnx.TensorProto, shifted: set[str]) -> int:
    """int8 ``tensor`` + 128 as uint8, once per initializer (nodes can share weights and zero points); 1 if done."""
    if tensor.name in shifted or tensor.data_type != onnx.TensorProto.INT8:
        return 0
    values = numpy_helper.to_array(tensor).astype(np.int16) + SHIFT
    tensor.CopyFrom(numpy_helper.from_array(values.astype(np.uint8), tensor.name))
    shifted.add(tensor.name)
    return 1


def servable_graph(path: Path, arithmetic: str | None = None) -> str | bytes:
    """``path`` for ORT to load, or, where u8u8 is the arithmetic (:func:`int8_arithmetic` of ``arithmetic``) and
    the graph has int8 weights, the graph rewritten by :func:`as_u8u8`, serialized."""
    if int8_arithmetic(arithmetic) == "u8s8":
        return str(path)
    model = onnx.load(str(path))
    if not as_u8u8(model):
        return str(path)
    _log_once(path)
    return model.SerializeToString()


@functools.cache
def _log_once(path: Path) -> None:
    log.info(
        "%s: int8 weights served as u8u8, exact on every CPU (ONNX Runtime's u8s8 kernels saturate on x86 without"
        " VNNI; %s=u8s8 overrides)",
        path,
        OVERRIDE,
    )
