"""Swap 2:4-sparse Linear weights for ``torch.sparse`` semi-structured tensors, layer by layer, on CUDA.

``to_sparse_semi_structured`` is inference-only, CUDA-only (compute capability 8.0+) and needs
fp16/bf16 weights whose every group of 4 input weights holds at most 2 non-zeros; its packer does
not check that, so this module does. Each eligible layer is converted only after its output
matches the dense layer on a representative input, and only if it is faster there: small GEMMs
are often slower sparse (pytorch#111339), so the per-layer decision is measured, not assumed.

What "faster" means depends on how the model is served. ``timing="eager"`` counts the host's
dispatch, which for torch's cuSPARSELt path includes a matmul plan built on every call (measured
with torch 2.11 on an H100: 0.5 to 2.6 ms of host time per call against a 0.1 ms kernel,
docs/results/bench.md; not measured since with the pinned torch). ``timing="graph"`` counts GPU time
alone, with the call captured in a CUDA graph: what a server that captures its model (CUDA graphs,
``torch.compile(mode="reduce-overhead")``) sees. ``timing="none"`` converts every eligible, exact layer
unmeasured: what a serving benchmark of the 2:4 model as a whole needs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from distill.architectures.linears import is_linear, is_transposed
from distill.kernels.sparsity import is_nm_sparse

log = logging.getLogger(__name__)
SPARSE_DTYPES = (torch.float16, torch.bfloat16)
# cuSPARSELt's minimum weight shape for fp16/bf16 (torch 2.13 table); CUTLASS needs more.
MIN_ROWS, MIN_COLS = 16, 16


@dataclass
class LayerDecision:
    name: str
    converted: bool
    reason: str
    dense_ms: float | None = None
    sparse_ms: float | None = None


def ineligibility(weight: Tensor) -> str | None:
    """Why ``weight`` cannot become a semi-structured tensor, or ``None`` if it can."""
    rows, cols = weight.shape
    if rows < MIN_ROWS or cols < MIN_COLS or rows % MIN_ROWS or cols % MIN_COLS:
        return f"shape {tuple(weight.shape)} is not a multiple of ({MIN_ROWS}, {MIN_COLS})"
    if not is_nm_sparse(weight, 2, 4):
        return "not 2:4 sparse"
    if weight.dtype not in SPARSE_DTYPES:
        return f"dtype {weight.dtype}; needs float16 or bfloat16 (float32 would be a 1:2 pattern)"
    if weight.device.type != "cuda":
        return f"on {weight.device.type}; semi-structured sparsity needs CUDA"
    return None


def cuda_time_ms(fn: Callable[[], Tensor], repeats: int = 50) -> float:
    """Median time of ``fn`` in milliseconds, with CUDA events."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def graph_time_ms(fn: Callable[[], Tensor], calls: int = 20, repeats: int = 20) -> float:
    """GPU time of one call of ``fn`` in milliseconds, with no launch gaps: ``calls`` calls
    captured in one CUDA graph and replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # capture needs the call's lazy initialisation done, on a side stream
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return cuda_time_ms(graph.replay, repeats=repeats) / calls


TIMINGS = ("eager", "graph", "none")


@torch.inference_mode()
def convert_layer(name: str, layer: nn.Module, tokens: int, timer=cuda_time_ms) -> LayerDecision:
    """Convert one layer in place if it is eligible, exact enough and faster on ``tokens`` inputs."""
    # The semi-structured tensor dispatches through F.linear, which a Conv1D (x @ W, W stored [in, out]) never calls.
    reason = "Conv1D: the 2:4 kernels run only under nn.Linear" if is_transposed(layer) else ineligibility(layer.weight)
    if reason is not None:
        return LayerDecision(name, False, reason)
    sample = torch.randn(tokens, layer.in_features, device=layer.weight.device, dtype=layer.weight.dtype)
    dense_out = layer(sample)
    dense_ms = timer(lambda: layer(sample)) if timer is not None else None
    dense_weight = layer.weight
    layer.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(dense_weight), requires_grad=False)
    sparse_out = layer(sample)
    if not torch.allclose(sparse_out, dense_out, rtol=1e-2, atol=1e-2):
        layer.weight = dense_weight
        return LayerDecision(name, False, "sparse output differs from dense", dense_ms)
    if timer is None:
        return LayerDecision(name, True, "converted, speed not measured")
    sparse_ms = timer(lambda: layer(sample))
    if sparse_ms >= dense_ms:
        layer.weight = dense_weight
        return LayerDecision(name, False, "sparse is not faster", dense_ms, sparse_ms)
    return LayerDecision(name, True, "converted", dense_ms, sparse_ms)


def to_semi_structured(model: nn.Module, tokens: int = 2048, timing: str = "eager") -> list[LayerDecision]:
    """Convert every eligible 2:4 Linear of a CUDA fp16/bf16 ``model`` in place; one decision per Linear.
    ``timing`` ("eager", "graph" or "none", module docstring) is how each layer's speed is judged."""
    if timing not in TIMINGS:
        raise ValueError(f"timing={timing!r}; expected one of {', '.join(map(repr, TIMINGS))}")
    timer = {"eager": cuda_time_ms, "graph": graph_time_ms, "none": None}[timing]
    decisions = [
        convert_layer(name, module, tokens, timer) for name, module in model.named_modules() if is_linear(module)
    ]
    converted = sum(decision.converted for decision in decisions)
    log.info("semi-structured 2:4: %d of %d Linear layers converted", converted, len(decisions))
    return decisions
