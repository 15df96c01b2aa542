"""Launch settings of the Triton KD-loss kernel (block size x warps per row) on one GPU.

    python bench/kd_triton_configs.py [--vocab 131072] [--positions 8192] [--dtype bfloat16]

Times ``kd_rows`` (forward pass, which also writes the gradient) for every pair with
``triton.testing.do_bench`` (median), next to the bytes the kernel must move at the least
(both logits read twice, the gradient written once) over the measured time. Prints markdown,
writes JSON. Needs CUDA.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

BLOCKS = [1024, 2048, 4096, 8192]
WARPS = [4, 8, 16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--positions", type=int, default=8192)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", default="bench/results/kd_triton_configs.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kd_triton_configs.py needs a CUDA GPU")
    from triton.testing import do_bench

    from distill.kernels.kd_loss_triton import kd_rows

    dtype = getattr(torch, args.dtype)
    student = torch.randn(args.positions, args.vocab, device="cuda", dtype=dtype).mul_(2)
    teacher = torch.randn(args.positions, args.vocab, device="cuda", dtype=dtype).mul_(2)
    labels = torch.randint(0, args.vocab, (args.positions,), device="cuda")
    moved = student.numel() * student.element_size() * 5
    rows = []
    for block, warps in itertools.product(BLOCKS, WARPS):
        ms = do_bench(
            lambda block=block, warps=warps: kd_rows(student, teacher, labels, 2.0, 0.5, -100, 1.0, block, warps),
            return_mode="median",
        )
        rows.append({"block": block, "num_warps": warps, "ms": ms, "tb_per_s": moved / ms / 1e9})
    print(f"\nkd_rows, {args.positions} x {args.vocab} {args.dtype}, {torch.cuda.get_device_name()}\n")
    print("| block | warps | time (ms) | least bytes / time (TB/s) |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['block']} | {row['num_warps']} | {row['ms']:.3f} | {row['tb_per_s']:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "gpu": torch.cuda.get_device_name(), "rows": rows}))


if __name__ == "__main__":
    main()
