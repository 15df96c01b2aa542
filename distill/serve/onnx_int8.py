"""CPU int8 deployment through ONNX Runtime: export a model's logits graph, quantize its Linears, serve it.

Why ONNX Runtime: torchao's CPU int8 path de-quantizes at every call and ran slower than fp32, while ORT's
``MatMulInteger`` runs int8 GEMMs; ``bench/int8_runtimes.py`` measures the candidates side by side
(docs/results/deploy.md). The quantization is ORT's dynamic scheme, the one QAT simulates
(``distill.callbacks.qat``); sessions serve it exactly on every CPU (:mod:`distill.serve.int8_arithmetic`). Only
the layers QAT fake-quantized are quantized: they are found in the graph by their weights' bytes, which no
exporter renames.

A served folder holds ``model.onnx``, the model's ``config.json`` and tokenizer, and ``quantization.json``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from torch import nn

from distill.architectures.linears import linear_weight
from distill.serve.first_token import FirstTokenClassifier, reads_first_token
from distill.serve.int8_arithmetic import servable_graph
from distill.utils.run_record import write_json

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"


@dataclass
class OnnxOutput:
    logits: torch.Tensor


class _LogitsOnly(nn.Module):
    """Positional inputs in, logits out: the shape an ONNX graph takes."""

    def __init__(self, model: nn.Module, input_names: list[str]) -> None:
        super().__init__()
        self.model, self.input_names = model, input_names
        self.extra = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.input_names, inputs, strict=True)), **self.extra).logits


def with_padding(example: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The example with at least one masked position: tracing an unpadded batch drops the mask from the graph."""
    padded = {name: tensor.clone() for name, tensor in example.items()}
    mask = padded["attention_mask"]
    if bool(mask.all()):
        mask[0, -1] = 0
    return padded


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Trace ``model`` with its eager attention. Its additive padding mask exports as one Add per layer, where
    SDPA's boolean mask exports as an expanded mask and a Where: the int8 graph of the bert_to_tiny student
    runs about 8 % faster at batch 32 in ONNX Runtime (docs/results/deploy.md)."""
    previous = getattr(model.config, "_attn_implementation", None)
    if previous in (None, "eager"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def export_onnx(
    model: nn.Module, example: Mapping[str, torch.Tensor], path: Path, first_token_only: bool = True
) -> Path:
    """The fp32 logits graph, dynamic in batch and sequence length. With ``first_token_only``, a BERT
    classifier's last layer is traced for the position its head reads (:mod:`distill.serve.first_token`)."""
    with eager_attention(model):
        return _export_logits_graph(model, with_padding(example), path, first_token_only)


def _export_logits_graph(
    model: nn.Module, example: Mapping[str, torch.Tensor], path: Path, first_token_only: bool
) -> Path:
    names = list(example)
    model = model.float().cpu().eval()
    first_token = first_token_only and reads_first_token(model)
    # A new wrapper is in training mode, and the exporter restores the wrapper's mode to all it holds when it
    # is done: the model would be left training, its dropout on.
    wrapper = (FirstTokenClassifier(model, names) if first_token else _LogitsOnly(model, names)).eval()
    logits_axes = {0: "batch", 1: "sequence"} if wrapper(*example.values()).dim() == 3 else {0: "batch"}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        wrapper,
        tuple(example.values()),
        str(path),
        input_names=names,
        output_names=["logits"],
        dynamic_axes={name: {0: "batch", 1: "sequence"} for name in names} | {"logits": logits_axes},
        opset_version=17,
        dynamo=False,
    )
    return path


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def matmuls_with_weights(path: Path, weights: Iterable[torch.Tensor]) -> list[str]:
    """Names of the MatMul nodes whose constant operand is one of ``weights``: as ``x @ W.T`` (``nn.Linear``)
    or as ``x @ W`` (layers that store the weight input-major, as GPT-2's Conv1D)."""
    wanted = _weight_digests(weights)
    graph = onnx.load(str(path), load_external_data=True).graph
    constants = {tensor.name: tensor for tensor in graph.initializer}
    nodes, found = [], set()
    for node in graph.node:
        constant = constants.get(node.input[1]) if node.op_type == "MatMul" else None
        index = wanted.get(_digest(numpy_helper.to_array(constant))) if constant is not None else None
        if index is not None:
            nodes.append(node.name)
            found.add(index)
    missing = sorted(set(wanted.values()) - found)
    if missing:
        raise ValueError(f"weights {missing} (by position) are not a MatMul operand in {path}: cannot quantize them")
    return nodes


def _weight_digests(weights: Iterable[torch.Tensor]) -> dict[str, int]:
    """Digest -> position of each weight, as ``W.T`` (``nn.Linear``: ``x @ W.T``) and as ``W`` (input-major
    layers such as GPT-2's Conv1D: ``x @ W``)."""
    wanted = {}
    for index, weight in enumerate(weights):
        array = weight.detach().float().cpu().numpy()
        wanted |= {_digest(array.T): index, _digest(array): index}
    return wanted


def gemms_as_matmuls(path: Path, weights: Iterable[torch.Tensor]) -> None:
    """Rewrite, in place, each plain ``Gemm`` whose constant weight is one of ``weights`` as ``MatMul`` (+ ``Add``
    of its bias): the exporter traces ``addmm`` layers (GPT-2's Conv1D) as Gemm, and ORT's dynamic int8
    quantizes MatMuls only. Other Gemms (a classifier's head) stay as they are."""
    wanted = _weight_digests(weights)
    model = onnx.load(str(path), load_external_data=True)
    constants = {tensor.name: tensor for tensor in model.graph.initializer}
    nodes, replaced, rewritten = [], set(), False
    for node in model.graph.node:
        settings = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
        plain = settings.get("alpha", 1.0) == settings.get("beta", 1.0) == 1.0 and not settings.get("transA", 0)
        constant = constants.get(node.input[1]) if node.op_type == "Gemm" and plain else None
        if constant is None or _digest(numpy_helper.to_array(constant)) not in wanted:
            nodes.append(node)
            continue
        weight, rewritten = node.input[1], True
        if settings.get("transB", 0):  # the MatMul needs the [in, out] matrix: the transposed copy replaces it
            transposed = numpy_helper.from_array(numpy_helper.to_array(constant).T, f"{weight}_transposed")
            model.graph.initializer.append(transposed)
            replaced.add(weight)
            weight = transposed.name
        biased = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}_product" if biased else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [product], name=f"{node.name}_MatMul"))
        if biased:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_Add"))
    if not rewritten:
        return  # no targeted Gemm: the file stays untouched, external weights and all
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _drop_unused(model.graph, replaced)
    onnx.save(model, str(path))


def _drop_unused(graph: onnx.GraphProto, names: set[str]) -> None:
    """Remove the initializers ``names`` that no node reads any more (a transposed copy replaced them)."""
    used = {name for node in graph.node for name in node.input}
    kept = [tensor for tensor in graph.initializer if tensor.name not in names or tensor.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def quantize_int8(fp32_path: Path, int8_path: Path, weights: Iterable[torch.Tensor]) -> list[str]:
    """ORT dynamic int8 of the MatMuls that use ``weights``; returns the quantized nodes' names."""
    weights = list(weights)
    gemms_as_matmuls(fp32_path, weights)
    nodes = matmuls_with_weights(fp32_path, weights)
    quantize_dynamic(
        fp32_path,
        int8_path,
        op_types_to_quantize=["MatMul"],
        nodes_to_quantize=nodes,
        per_channel=True,
        weight_type=QuantType.QInt8,
        extra_options={"MatMulConstBOnly": True},
    )
    return nodes


def save_int8(
    model: nn.Module, layers: list[str], tokenizer: Any, output_dir: Path, export: Callable[[Path], Any]
) -> Path:
    """``output_dir``: the int8 ONNX model of ``model`` (``layers`` quantized), its config and tokenizer.

    ``export(path)`` writes the fp32 graph (the task's: logits only, or a decoder step with a KV cache).
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    fp32_path = output_dir / "fp32.onnx"
    export(fp32_path)
    weights = [linear_weight(model.get_submodule(name)) for name in layers]  # [out, in], Conv1D's too
    nodes = quantize_int8(fp32_path, output_dir / ONNX_FILE, weights)
    fp32_bytes = fp32_path.stat().st_size
    fp32_path.unlink()
    model.config.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    write_json(
        output_dir / "quantization.json",
        {
            "runtime": f"onnxruntime {ort.__version__}",
            "weights": "int8 symmetric per output channel",
            "activations": "uint8 per tensor, dynamic",
            # For runtimes other than distill's own sessions, which apply this themselves.
            "exact_on": "CPUs with VNNI (or not x86); elsewhere ORT's u8s8 kernels saturate: shift the int8 weights"
            " and their zero points by 128 to uint8 (distill.serve.int8_arithmetic.as_u8u8)",
            "layers": layers,
            "nodes": nodes,
            "file_bytes": (output_dir / ONNX_FILE).stat().st_size,
            "fp32_file_bytes": fp32_bytes,
        },
    )
    log.info("int8 ONNX model: %d MatMuls quantized -> %s", len(nodes), output_dir / ONNX_FILE)
    return output_dir


class OnnxModel(nn.Module):
    """An ONNX Runtime session behind a Hugging Face-style call: ``model(**batch).logits``."""

    def __init__(
        self, path: Path | str, threads: int | None = None, session: ort.InferenceSession | None = None
    ) -> None:
        super().__init__()
        self.session = session or cpu_session(path, threads)
        self.input_names = [node.name for node in self.session.get_inputs()]

    def forward(self, **batch: torch.Tensor) -> OnnxOutput:
        missing = [name for name in self.input_names if name not in batch]
        if missing:
            raise KeyError(f"the ONNX model needs inputs {missing}; the batch has {sorted(batch)}")
        (logits,) = self.session.run(["logits"], {name: batch[name].cpu().numpy() for name in self.input_names})
        return OnnxOutput(torch.from_numpy(logits))


def cpu_session(path: Path | str, threads: int | None = None, arithmetic: str | None = None) -> ort.InferenceSession:
    """A CPU session of a served folder (or ``.onnx`` file) on ``threads`` threads (default: torch's), its int8
    MatMuls in ``arithmetic`` (:mod:`distill.serve.int8_arithmetic`; default: the exact one for this CPU)."""
    path = Path(path)
    if path.is_dir():
        path = path / ONNX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX model at {path}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    # Idle pool threads sleep instead of spinning: spinning steals the cores from whatever runs next in
    # this process (PyTorch's own pool, another session), which decides latency on a 2-core machine.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(servable_graph(path, arithmetic), options, providers=["CPUExecutionProvider"])
