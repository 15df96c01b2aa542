"""KD loss at language-model vocabulary sizes: peak memory and time, reference against the fused paths.

    python bench/kd_loss.py                      # CPU: vocab 32k and 128k, 4096 positions, fp32
    python bench/kd_loss.py --device cuda --dtype bfloat16 --vocab 131072 --positions 8192

Each arm (forward + backward of the loss on the same inputs) runs in a fresh subprocess so that
peaks do not mix: on CPU the peak is the resident memory (sampled every 0.2 ms) above what the
inputs already took, on CUDA ``max_memory_allocated`` above the inputs. Times are medians of ``--repeats`` runs
after one warm-up. Values and gradients are compared with the reference's. Prints markdown,
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ARMS = {"cpu": ["reference", "chunked"], "cuda": ["reference", "chunked", "triton"]}


def make_inputs(positions: int, vocab: int, device: str, dtype: torch.dtype):
    generator = torch.Generator(device="cpu").manual_seed(0)
    # In place, so that no freed temporary raises the memory high-water mark before the arm runs.
    student = torch.randn(positions, vocab, generator=generator).mul_(2).to(device, dtype).requires_grad_()
    teacher = torch.randn(positions, vocab, generator=generator).mul_(2).to(device, dtype)
    labels = torch.randint(0, vocab, (positions,), generator=generator).to(device)
    labels[::7] = -100
    return student, teacher, labels


def loss_fn(arm: str):
    from distill.kernels.kd_loss import fused_kd_loss

    return lambda s, t, y: fused_kd_loss(s, t, y, temperature=2.0, alpha=0.5, impl=arm)


class RssPeak:
    """Peak resident memory while the block runs, sampled every 0.2 ms (ru_maxrss is a lifetime
    high-water mark, so memory freed before the block would hide what the block allocates)."""

    def __enter__(self) -> RssPeak:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.before = self.peak = self.rss()
        self.running = True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page

    def sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.0002)

    def __exit__(self, *exc_info) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def extra(self) -> int:
        return self.peak - self.before


def measure_extra(fn, student, teacher, labels, device: str):
    """Run forward + backward once; return the gradient and the memory it took beyond the inputs."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        (grad,) = torch.autograd.grad(fn(student, teacher, labels), student)
        torch.cuda.synchronize()
        return grad, torch.cuda.max_memory_allocated() - before
    with RssPeak() as peak:
        (grad,) = torch.autograd.grad(fn(student, teacher, labels), student)
    return grad, peak.extra


def run_arm(arm: str, positions: int, vocab: int, device: str, dtype_name: str, repeats: int) -> dict:
    dtype = getattr(torch, dtype_name)
    student, teacher, labels = make_inputs(positions, vocab, device, dtype)
    fn = loss_fn(arm)
    grad, extra = measure_extra(fn, student, teacher, labels, device)
    times = []
    for _ in range(repeats):
        del grad
        started = time.perf_counter()
        loss = fn(student, teacher, labels)
        (grad,) = torch.autograd.grad(loss, student)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    torch.save({"loss": loss.detach().float().cpu(), "grad": grad.float().cpu()}, f"/tmp/kd_bench_{arm}.pt")
    return {"arm": arm, "peak_extra_bytes": extra, "seconds": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--positions", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="bench/results/kd_loss.json")
    args = parser.parse_args()
    if args.arm:  # a child process: one arm, one vocabulary size
        print(json.dumps(run_arm(args.arm, args.positions, args.vocab[0], args.device, args.dtype, args.repeats)))
        return
    results = []
    for vocab in args.vocab:
        for arm in ARMS[args.device]:
            child = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--arm",
                    arm,
                    "--vocab",
                    str(vocab),
                    "--positions",
                    str(args.positions),
                    "--device",
                    args.device,
                    "--dtype",
                    args.dtype,
                    "--repeats",
                    str(args.repeats),
                ],
                capture_output=True,
                text=True,
            )
            if child.returncode != 0:
                print(f"{arm} @ {vocab}: skipped ({child.stderr.strip().splitlines()[-1] if child.stderr else '?'})")
                continue
            row = json.loads(child.stdout.strip().splitlines()[-1]) | {"vocab": vocab}
            reference = torch.load("/tmp/kd_bench_reference.pt")
            mine = torch.load(f"/tmp/kd_bench_{arm}.pt")
            row["loss_abs_diff"] = float((mine["loss"] - reference["loss"]).abs())
            row["grad_rel_diff"] = float((mine["grad"] - reference["grad"]).abs().max() / reference["grad"].abs().max())
            results.append(row)
    print(f"\nKD loss fwd+bwd, {args.positions} positions, {args.dtype} on {args.device}, torch {torch.__version__}\n")
    print(
        "| vocab | impl | peak extra memory (MiB) | vs reference | time (ms) | speed-up | loss diff | grad rel diff |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in results:
        ref = next(r for r in results if r["vocab"] == row["vocab"] and r["arm"] == "reference")
        print(
            f"| {row['vocab']} | {row['arm']} | {row['peak_extra_bytes'] / 2**20:.0f} "
            f"| {row['peak_extra_bytes'] / ref['peak_extra_bytes']:.3f} | {1000 * row['seconds']:.0f} "
            f"| {ref['seconds'] / row['seconds']:.2f}x | {row['loss_abs_diff']:.1e} | {row['grad_rel_diff']:.1e} |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"results": results, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
