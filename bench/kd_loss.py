"""KD loss at language-model vocabulary sizes: peak memory and time, reference against the fused paths.

    python bench/kd_loss.py                      # CPU: vocab 32k and 128k, 4096 positions, fp32
    python bench/kd_loss.py --device cuda --dtype bfloat16 --vocab 131072 --positions 8192
    python bench/kd_loss.py --inputs hidden ...  # from hidden states and LM heads, Liger-Kernel too

``--inputs logits`` times the loss on given student and teacher logits (``fused_kd_loss``).
``--inputs hidden`` starts from both models' hidden states and LM heads (``--hidden`` wide), so
the projections are part of the work: the reference projects and calls ``kd_loss``, the fused
paths project chunk by chunk (``kd_loss_linear``), and Liger-Kernel's fused-linear distillation
loss (``LigerFusedLinearJSDLoss`` at beta=0: forward KL, the same contract; compiled), when it
imports, does the same work its own way. Each arm (forward + backward on the same inputs) runs in
a fresh subprocess so that peaks do not mix, after one warm-up call (compilation): on CPU the peak
is the resident memory (sampled every 0.2 ms) above what the inputs already took, on CUDA
``max_memory_allocated`` above the inputs. Times are medians of ``--repeats`` runs. Values and
gradients are compared with the reference's. Prints markdown, writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

TEMPERATURE, ALPHA = 2.0, 0.5


def arms(device: str, inputs: str) -> list[str]:
    names = ["reference", "chunked"] + (["triton"] if device == "cuda" else [])
    if inputs == "hidden" and importlib.util.find_spec("liger_kernel") is not None:
        names.append("liger")
    return names


def make_inputs(inputs: str, positions: int, vocab: int, hidden: int, device: str, dtype: torch.dtype):
    """``(student tensors that get gradients, teacher tensors, labels)``; logits, or hidden states and heads."""
    generator = torch.Generator(device="cpu").manual_seed(0)

    def make(*shape, scale=1.0):
        # In place, so that no freed temporary raises the memory high-water mark before the arm runs.
        return torch.randn(*shape, generator=generator).mul_(scale).to(device, dtype)

    if inputs == "logits":
        student, teacher = [make(positions, vocab, scale=2).requires_grad_()], [make(positions, vocab, scale=2)]
    else:
        head_scale = 2 / hidden**0.5  # logits of about the spread above
        student = [make(positions, hidden).requires_grad_(), make(vocab, hidden, scale=head_scale).requires_grad_()]
        teacher = [make(positions, hidden), make(vocab, hidden, scale=head_scale)]
    labels = torch.randint(0, vocab, (positions,), generator=generator).to(device)
    labels[::7] = -100
    return student, teacher, labels


def loss_fn(arm: str, inputs: str):
    """``f(student_tensors, teacher_tensors, labels) -> loss`` for one arm."""
    settings = dict(temperature=TEMPERATURE, alpha=ALPHA)
    if arm == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        soft_weight = (1 - ALPHA) * TEMPERATURE**2  # Liger leaves out the T^2 of this contract
        liger = LigerFusedLinearJSDLoss(ALPHA, soft_weight, beta=0.0, temperature=TEMPERATURE)
        return lambda student, teacher, labels: liger(*student, *teacher, labels)
    if inputs == "logits":
        from distill.kernels.kd_loss import fused_kd_loss

        return lambda student, teacher, labels: fused_kd_loss(*student, *teacher, labels, impl=arm, **settings)
    from distill.kernels.kd_loss_linear import kd_loss_linear

    return lambda student, teacher, labels: kd_loss_linear(
        student[0], student[1], teacher[0], teacher[1], labels, impl=arm, **settings
    )


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
    """Run forward + backward once; return the gradients and the memory they took beyond the inputs."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        grads = torch.autograd.grad(fn(student, teacher, labels), student)
        torch.cuda.synchronize()
        return grads, torch.cuda.max_memory_allocated() - before
    with RssPeak() as peak:
        grads = torch.autograd.grad(fn(student, teacher, labels), student)
    return grads, peak.extra


def run_arm(arm: str, args: argparse.Namespace, vocab: int) -> dict:
    student, teacher, labels = make_inputs(
        args.inputs, args.positions, vocab, args.hidden, args.device, getattr(torch, args.dtype)
    )
    fn = loss_fn(arm, args.inputs)
    torch.autograd.grad(fn(student, teacher, labels), student)  # warm-up: compilation, lazy initialisation
    grads, extra = measure_extra(fn, student, teacher, labels, args.device)
    times = []
    for _ in range(args.repeats):
        del grads
        started = time.perf_counter()
        loss = fn(student, teacher, labels)
        grads = torch.autograd.grad(loss, student)
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    result = {"loss": loss.detach().float().cpu(), "grads": [grad.float().cpu() for grad in grads]}
    torch.save(result, f"/tmp/kd_bench_{arm}.pt")
    return {"arm": arm, "peak_extra_bytes": extra, "seconds": statistics.median(times)}


def differences(arm: str) -> dict[str, float]:
    """Loss and largest relative gradient difference of ``arm`` from the reference arm."""
    reference, mine = torch.load("/tmp/kd_bench_reference.pt"), torch.load(f"/tmp/kd_bench_{arm}.pt")
    grad_rel = max(
        float((grad - want).abs().max() / want.abs().max())
        for grad, want in zip(mine["grads"], reference["grads"], strict=True)
    )
    return {"loss_abs_diff": float((mine["loss"] - reference["loss"]).abs()), "grad_rel_diff": grad_rel}


def versions(device: str) -> dict[str, str]:
    found = {"torch": torch.__version__}
    for package in ("triton", "liger-kernel"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[package] = importlib.metadata.version(package)
    if device == "cuda":
        found["gpu"] = torch.cuda.get_device_name()
    return found


def run_child(arm: str, vocab: int, args: argparse.Namespace) -> dict | None:
    options = ["--positions", str(args.positions), "--device", args.device, "--dtype", args.dtype]
    options += ["--repeats", str(args.repeats), "--inputs", args.inputs, "--hidden", str(args.hidden)]
    command = [sys.executable, __file__, "--arm", arm, "--vocab", str(vocab), *options]
    child = subprocess.run(command, capture_output=True, text=True)
    if child.returncode != 0:
        print(f"{arm} @ {vocab}: skipped ({child.stderr.strip().splitlines()[-1] if child.stderr else '?'})")
        return None
    return json.loads(child.stdout.strip().splitlines()[-1]) | {"vocab": vocab} | differences(arm)


def print_table(results: list[dict], args: argparse.Namespace, found: dict[str, str]) -> None:
    source = "logits" if args.inputs == "logits" else f"hidden states ({args.hidden}) and LM heads"
    print(f"\nKD loss fwd+bwd from {source}, {args.positions} positions, {args.dtype} on {args.device}, {found}\n")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--positions", type=int, default=4096)
    parser.add_argument("--inputs", default="logits", choices=["logits", "hidden"])
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size with --inputs hidden")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/kd_loss[_hidden].json)")
    args = parser.parse_args()
    if args.arm:  # a child process: one arm, one vocabulary size
        print(json.dumps(run_arm(args.arm, args, args.vocab[0])))
        return
    rows = (run_child(arm, vocab, args) for vocab in args.vocab for arm in arms(args.device, args.inputs))
    results = [row for row in rows if row is not None]
    found = versions(args.device)
    print_table(results, args, found)
    out = Path(args.out or f"bench/results/kd_loss{'_hidden' if args.inputs == 'hidden' else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results, "args": vars(args), "versions": found}, indent=2))


if __name__ == "__main__":
    main()
