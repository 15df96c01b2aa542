"""2:4 semi-structured Linear layers against dense ones on a GPU, same process, fp16 and bf16.

    python bench/sparse24.py [--student logs/bert_to_tiny/runs/<run>/student]

Shapes: BERT-base's FFN (768->3072 and 3072->768) at batch x sequence from 512 to 16384 tokens,
plus, with --student, the 2:4 Linear weights of an exported student (its ``model.safetensors``,
or a safetensors file of weights), one per shape, at the same token counts. Each weight gets an
exact 2:4 mask (distill.kernels.nm_mask). Arms, outputs compared with the dense layer's:

- dense: the masked ``nn.Linear``;
- torch 2:4: the layer with ``torch.sparse.to_sparse_semi_structured`` weights, as
  ``distill.serve.semi_structured`` exports it (cuSPARSELt where torch ships it, else CUTLASS);
- tuned cuSPARSELt: ``torch._cslt_sparse_mm`` with the fastest of a few algorithm ids (0,
  cuSPARSELt's own search pick, ``--algs``) and output layouts for this product, by timing each.

Each arm is timed two ways: eager (CUDA events around one call, median of 50; counts the host's
dispatch, which for torch's 2:4 path includes a cuSPARSELt plan per call) and as a CUDA graph
(20 calls captured, replayed; the GPU's own time, what a captured or compiled server sees).
Prints markdown, writes JSON. Needs CUDA with compute capability 8.0+.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from distill.kernels.sparsity import is_nm_sparse, nm_mask
from distill.serve.semi_structured import cuda_time_ms, graph_time_ms

TOKENS = [512, 2048, 4096, 8192, 16384]
BERT_BASE = {"ffn_in 768->3072": (768, 3072), "ffn_out 3072->768": (3072, 768)}


def masked_linear(in_features: int, out_features: int, dtype: torch.dtype, weight=None) -> nn.Linear:
    layer = nn.Linear(in_features, out_features).to("cuda", dtype)
    with torch.no_grad():
        if weight is not None:
            layer.weight.copy_(weight)
        layer.weight.mul_(nm_mask(layer.weight))
    return layer


def relative_error(out: torch.Tensor, want: torch.Tensor) -> float:
    return float((out.float() - want.float()).abs().max() / want.float().abs().max())


def candidate_alg_ids(compressed: torch.Tensor, inputs: torch.Tensor, extra: list[int]) -> list[int]:
    """cuSPARSELt's default algorithm (0), the one its own search picks, and ``extra``."""
    found = {0, *extra}
    with contextlib.suppress(RuntimeError):
        found.add(int(torch._cslt_sparse_mm_search(compressed, inputs.t())))
    return sorted(found)


def tuned_cusparselt(layer: nn.Linear, inputs: torch.Tensor, want: torch.Tensor, dense_ms: float, algs: list[int]):
    """The fastest candidate cuSPARSELt algorithm id and output layout (CUDA-graph time) for
    ``layer(inputs)``. Ids cuSPARSELt refuses, or whose result is off by more than bf16 rounding
    (relative 1e-2), are skipped. Each capture takes seconds on the host, hence few candidates."""
    compressed = torch._cslt_compress(layer.weight)
    best: dict = {}
    for alg_id, fused in itertools.product(candidate_alg_ids(compressed, inputs, algs), (False, True)):

        def call(alg_id=alg_id, fused=fused):
            out = torch._cslt_sparse_mm(compressed, inputs.t(), layer.bias, transpose_result=fused, alg_id=alg_id)
            return out if fused else out.t()

        try:
            error = relative_error(call(), want)
        except RuntimeError:
            continue
        ms = graph_time_ms(call) if error < 1e-2 else float("inf")
        if ms < best.get("tuned_graph_ms", float("inf")):
            best = {"tuned_graph_ms": ms, "alg_id": alg_id, "fused_transpose": fused, "tuned_rel_error": error}
    return best | ({"tuned_speedup": dense_ms / best["tuned_graph_ms"]} if best else {})


@torch.inference_mode()
def compare(layer: nn.Linear, tokens: int, algs: list[int]) -> dict:
    inputs = torch.randn(tokens, layer.in_features, device="cuda", dtype=layer.weight.dtype)
    want = layer(inputs)
    sparse = nn.Linear(layer.in_features, layer.out_features).to("cuda", layer.weight.dtype)
    sparse.bias = layer.bias
    sparse.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(layer.weight), requires_grad=False)
    row = {
        "tokens": tokens,
        "dense_ms": cuda_time_ms(lambda: layer(inputs)),
        "torch24_ms": cuda_time_ms(lambda: sparse(inputs)),
        "dense_graph_ms": graph_time_ms(lambda: layer(inputs)),
        "torch24_graph_ms": graph_time_ms(lambda: sparse(inputs)),
        "torch24_rel_error": relative_error(sparse(inputs), want),
    }
    if torch.backends.cusparselt.is_available():
        row |= tuned_cusparselt(layer, inputs, want, row["dense_graph_ms"], algs)
    return row


def student_layers(path: str) -> dict[str, torch.Tensor]:
    """One 2:4 Linear weight per shape of an exported student folder (or of a safetensors file),
    named by the layers that share it: speed depends on the shape, not on the values."""
    from safetensors.torch import load_file

    file = Path(path) / "model.safetensors" if Path(path).is_dir() else Path(path)
    by_shape: dict[tuple, list] = {}
    for name, weight in sorted(load_file(file).items()):
        if name.endswith(".weight") and weight.dim() == 2 and weight.shape[0] % 16 == 0 and is_nm_sparse(weight):
            by_shape.setdefault(tuple(weight.shape), []).append((name.removesuffix(".weight"), weight))
    return {
        f"student {found[0][0]} (+{len(found) - 1} alike) {shape[1]}->{shape[0]}": found[0][1]
        for shape, found in by_shape.items()
    }


def print_table(rows: list[dict]) -> None:
    print(f"\n2:4 semi-structured vs dense Linear, {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print(
        "| layer | dtype | tokens | dense (ms) | torch 2:4 (ms) | dense, graph (ms) | torch 2:4, graph (ms) "
        "| tuned cuSPARSELt, graph (ms) | alg id, fused | speed-up (graph, tuned) |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    for row in rows:
        tuned = row.get("tuned_graph_ms")
        print(
            f"| {row['layer']} | {row['dtype']} | {row['tokens']} | {row['dense_ms']:.4f} | {row['torch24_ms']:.4f} "
            f"| {row['dense_graph_ms']:.4f} | {row['torch24_graph_ms']:.4f} "
            + (
                f"| {tuned:.4f} | {row['alg_id']}, {row['fused_transpose']} | {row['tuned_speedup']:.2f}x |"
                if tuned
                else "| - | - | - |"
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", help="an exported student folder whose 2:4 Linear layers to time as well")
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    parser.add_argument("--algs", type=int, nargs="*", default=[], help="more cuSPARSELt algorithm ids to try")
    parser.add_argument("--out", default="bench/results/sparse24.json")
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        sys.exit("bench/sparse24.py needs a CUDA GPU with compute capability 8.0+ (2:4 sparse tensor cores)")
    shapes = {name: (shape, None) for name, shape in BERT_BASE.items()}
    if args.student:
        shapes |= {name: ((w.shape[1], w.shape[0]), w) for name, w in student_layers(args.student).items()}
    rows, started = [], time.perf_counter()
    for dtype, (name, ((fan_in, fan_out), weight)) in itertools.product(
        (torch.float16, torch.bfloat16), shapes.items()
    ):
        layer = masked_linear(fan_in, fan_out, dtype, weight)
        for tokens in args.tokens:
            rows.append(
                {"layer": name, "dtype": str(dtype).removeprefix("torch."), **compare(layer, tokens, args.algs)}
            )
            print(json.dumps(rows[-1] | {"wall_s": time.perf_counter() - started}), file=sys.stderr, flush=True)
    print_table(rows)
    found = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    if torch.backends.cusparselt.is_available():
        found["cusparselt"] = torch.backends.cusparselt.version()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"versions": found, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
