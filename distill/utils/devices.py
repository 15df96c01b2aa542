"""Where a model runs, and its inputs moved there: for the code that runs models outside Lightning."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter; the CPU for a model with none (an ONNX Runtime session)."""
    parameter = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    return parameter.device if parameter is not None else torch.device("cpu")


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {name: value.to(device) if isinstance(value, Tensor) else value for name, value in batch.items()}


@contextlib.contextmanager
def on_gpu_if_any(model: nn.Module) -> Iterator[torch.device]:
    """``model`` on the current CUDA device for the block, if there is one, and back where it was after:
    for passes outside Lightning that a GPU does in seconds and a CPU in minutes (the teacher's store)."""
    home = model_device(model)
    target = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else home
    model.to(target)
    try:
        yield target
    finally:
        model.to(home)


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo``; ``None`` where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    lines = [line.split(":", 1)[1] for line in text.splitlines() if line.startswith("flags")]
    return frozenset(lines[0].split()) if lines else None


def cpu_runs_bf16_natively() -> bool:
    """Whether PyTorch's CPU kernels (oneDNN) have bf16 paths here, as on AVX-512 and AMX CPUs. Without them a
    bf16 matmul takes a reference path, an order of magnitude slower than fp32 or worse. Measured once on a
    2-core AVX2 EPYC with idle cores: a one-decoder-layer student's training step 38x slower under bf16
    autocast than in fp32, a single Linear(576, 1536)'s forward and backward 29x; the ratio moves with the
    shapes and the load. Command and setup: docs/results/causal-lm.md ("A CPU without bf16 kernels")."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private op: where it is gone, the flags decide; unknown is native
        flags = cpu_flags()
        return flags is None or bool(flags & NATIVE_BF16_FLAGS)


def warn_if_emulated_bf16(trainer: pl.Trainer) -> None:
    """Say so when a CPU run asks for bf16 that this CPU can only emulate, an order of magnitude slower than fp32."""
    on_cpu = isinstance(trainer.accelerator, CPUAccelerator)
    if "bf16" in str(trainer.precision) and on_cpu and not cpu_runs_bf16_natively():
        rank_zero_warn(
            f"trainer.precision={trainer.precision} on a CPU without bf16 kernels (neither AVX-512 nor AMX): "
            "its bf16 matmuls take a reference path, far slower than fp32; trainer.precision=32-true runs faster"
        )
