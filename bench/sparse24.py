"""2:4 semi-structured Linear layers against dense ones on a GPU, same process, fp16 and bf16.

    python bench/sparse24.py [--student logs/bert_to_tiny/runs/<run>/student]

Shapes: BERT-base's FFN (768->3072 and 3072->768) at batch x sequence from 512 to 16384 tokens,
plus, with --student, every 2:4 Linear of an exported student at the same token counts. Each
weight gets an exact 2:4 mask (distill.kernels.nm_mask), then the dense masked layer and its
torch.sparse.to_sparse_semi_structured twin are timed with CUDA events (median of 50 after
warm-up), outputs compared. Prints which layers gained and by how much; writes JSON.
Needs CUDA with compute capability 8.0+; exits with a message elsewhere.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

from distill.kernels import is_nm_sparse, nm_mask
from distill.semi_structured import cuda_time_ms

TOKENS = [512, 2048, 4096, 8192, 16384]
BERT_BASE = {"ffn_in 768->3072": (768, 3072), "ffn_out 3072->768": (3072, 768)}


def masked_linear(in_features: int, out_features: int, dtype: torch.dtype, weight=None) -> nn.Linear:
    layer = nn.Linear(in_features, out_features).to("cuda", dtype)
    with torch.no_grad():
        if weight is not None:
            layer.weight.copy_(weight)
        layer.weight.mul_(nm_mask(layer.weight))
    return layer


@torch.inference_mode()
def compare(layer: nn.Linear, tokens: int) -> dict:
    inputs = torch.randn(tokens, layer.in_features, device="cuda", dtype=layer.weight.dtype)
    dense_out = layer(inputs)
    dense_ms = cuda_time_ms(lambda: layer(inputs))
    sparse = nn.Linear(layer.in_features, layer.out_features).to("cuda", layer.weight.dtype)
    sparse.bias = layer.bias
    sparse.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(layer.weight), requires_grad=False)
    max_error = float((sparse(inputs) - dense_out).abs().max())
    sparse_ms = cuda_time_ms(lambda: sparse(inputs))
    return {
        "tokens": tokens,
        "dense_ms": dense_ms,
        "sparse_ms": sparse_ms,
        "speedup": dense_ms / sparse_ms,
        "max_abs_error": max_error,
    }


def student_layers(path: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path)
    return {
        name: module.weight.detach()
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and is_nm_sparse(module.weight) and module.weight.shape[0] % 16 == 0
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", help="an exported student folder whose 2:4 Linear layers to time as well")
    parser.add_argument("--out", default="bench/results/sparse24.json")
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        sys.exit("bench/sparse24.py needs a CUDA GPU with compute capability 8.0+ (2:4 sparse tensor cores)")
    shapes = {name: (shape, None) for name, shape in BERT_BASE.items()}
    if args.student:
        shapes |= {f"student {name}": ((w.shape[1], w.shape[0]), w) for name, w in student_layers(args.student).items()}
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for name, ((fan_in, fan_out), weight) in shapes.items():
            layer = masked_linear(fan_in, fan_out, dtype, weight)
            for tokens in TOKENS:
                rows.append({"layer": name, "dtype": str(dtype).removeprefix("torch."), **compare(layer, tokens)})
    device = torch.cuda.get_device_name()
    print(f"\n2:4 semi-structured vs dense Linear, {device}, torch {torch.__version__}\n")
    print(
        "| layer | dtype | tokens | dense (ms) | 2:4 (ms) | speed-up | max abs error |\n|---|---|---|---|---|---|---|"
    )
    for row in rows:
        print(
            f"| {row['layer']} | {row['dtype']} | {row['tokens']} | {row['dense_ms']:.3f} | {row['sparse_ms']:.3f} "
            f"| {row['speedup']:.2f}x | {row['max_abs_error']:.1e} |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": device, "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
