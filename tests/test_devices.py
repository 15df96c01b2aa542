"""A CPU run that asks for bf16 this CPU can only emulate is told so; every other run is not."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch

from distill.utils import devices


def trainer(precision: str) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, precision=precision, logger=False, enable_progress_bar=False)


@pytest.mark.parametrize(
    ("precision", "native", "warns"),
    [("bf16-mixed", False, True), ("bf16-true", False, True), ("bf16-mixed", True, False), ("32-true", False, False)],
)
def test_emulated_bf16_is_named(precision: str, native: bool, warns: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "cpu_runs_bf16_natively", lambda: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        devices.warn_if_emulated_bf16(trainer(precision))
    named = [w for w in caught if f"trainer.precision={precision}" in str(w.message)]
    assert len(named) == int(warns)
    if warns:
        assert "32-true" in str(named[0].message)


def missing_op() -> bool:
    raise AttributeError("no such op")


@pytest.mark.parametrize(
    ("flags", "native"),
    [(frozenset({"avx2"}), False), (frozenset({"avx512_bf16"}), True), (frozenset({"amx_bf16"}), True), (None, True)],
)
def test_without_torchs_check_the_cpu_flags_decide(flags, native, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", missing_op, raising=False)
    monkeypatch.setattr(devices, "cpu_flags", lambda: flags)
    assert devices.cpu_runs_bf16_natively() is native


def test_cpu_flags_are_read_once_and_hold_the_instruction_sets() -> None:
    flags = devices.cpu_flags()
    if flags is None:
        pytest.skip("/proc/cpuinfo has no flags here")
    assert devices.cpu_flags() is flags and "sse2" in flags  # every x86-64 CPU has it


def test_store_passes_run_on_the_gpu_when_there_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """on_gpu_if_any (the teacher-store passes' device choice) picks the current CUDA device and moves back."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    model, moves = torch.nn.Linear(2, 2), []
    monkeypatch.setattr(model, "to", moves.append)
    with devices.on_gpu_if_any(model) as device:
        assert device == torch.device("cuda", 1)
    assert moves == [torch.device("cuda", 1), torch.device("cpu")]
