"""The serving bench's GPU arms: the teacher and the student in bf16, the 2:4 student on the sparse kernels and
the student with int8 GEMMs, each request timed with the device synchronised.

* ``*_bf16_gpu``: the PyTorch model cast to bf16 on the GPU, the baseline of the other GPU arms.
* ``student_2:4_gpu`` (a student whose ``compression.json`` says 2:4): its Linear layers swapped for
  ``torch.sparse`` semi-structured weights by :func:`distill.serve.semi_structured.to_semi_structured`, every
  eligible layer whether or not it alone is faster: the arm measures the model as served.
* ``student_int8_gpu``: torchao's dynamic int8 activations x int8 weights on the Linear layers of the
  student's blocks (``torch._int_mm``): the GPU's int8 path, as ONNX Runtime's is the CPU's.

An arm that cannot be served here is returned with the reason instead, and the bench lists it as skipped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.pruning.oneshot.sequential import target_linears

GPU_DTYPE = torch.bfloat16


def synchronized(call: Callable[[], Any]) -> Callable[[], Any]:
    """``call`` followed by a device synchronisation, so that a host timer around it sees the GPU's work."""

    def run() -> Any:
        result = call()
        torch.cuda.synchronize()
        return result

    return run


def is_two_four(student_dir: Path) -> bool:
    manifest = student_dir / "compression.json"
    return manifest.is_file() and json.loads(manifest.read_text()).get("NMSparsity", {}).get("pattern") == "2:4"


def int8_gemm_layers(model: nn.Module) -> nn.Module:
    """``model`` with torchao's dynamic int8 x int8 Linear on the layers of its blocks (not the head)."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    names = set(target_linears(model, None))
    quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda _module, name: name in names)
    return model


def gpu_models(
    load: Callable[..., nn.Module], teacher_path: str | None, student_dir: Path, causal: bool
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The GPU arms (``load(reference, dtype=...)`` loads a model), and the arms that cannot be served here."""
    if not torch.cuda.is_available():
        skipped = {"gpu": "no CUDA GPU here: the bf16, 2:4 and int8 GPU arms need one"}
        if is_two_four(student_dir):
            skipped["student_2:4_gpu"] = "2:4 kernels (cuSPARSELt/CUTLASS) need a CUDA GPU; none here"
        return {}, skipped
    models, skipped = {}, {}
    if teacher_path:
        models["teacher_bf16_gpu"] = load(teacher_path, dtype=GPU_DTYPE).cuda().eval()
    models["student_bf16_gpu"] = load(student_dir, dtype=GPU_DTYPE).cuda().eval()
    if is_two_four(student_dir) and not causal:
        from distill.serve.semi_structured import to_semi_structured

        sparse = load(student_dir, dtype=GPU_DTYPE).cuda().eval()
        decisions = to_semi_structured(sparse, timing="none")
        if any(decision.converted for decision in decisions):
            models["student_2:4_gpu"] = sparse
        else:
            skipped["student_2:4_gpu"] = f"no layer converted: {sorted({d.reason for d in decisions})}"
    try:
        models["student_int8_gpu"] = int8_gemm_layers(load(student_dir, dtype=GPU_DTYPE).cuda().eval())
    except Exception as error:  # an optional backend across torch versions: any failure is a reason
        skipped["student_int8_gpu"] = f"torchao int8 GEMMs unavailable: {type(error).__name__}: {error}"
    return models, skipped
