"""A run ended by a signal exits 128 + signal, keeps its checkpoints and says so (distill/pipeline/interrupt.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from distill.pipeline.interrupt import exit_code, resume_command, signal_of


def test_exit_code_is_what_a_shell_reports_for_the_signal() -> None:
    assert exit_code(signal.SIGTERM) == 143 and exit_code(signal.SIGINT) == 130


def test_signal_of_lightnings_exceptions() -> None:
    assert signal_of(SIGTERMException()) == signal.SIGTERM
    assert signal_of(KeyboardInterrupt()) == signal.SIGINT
    try:  # what Lightning does on Ctrl-C
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            sys.exit(1)
    except SystemExit as lightning_exit:
        assert signal_of(lightning_exit) == signal.SIGINT
    assert signal_of(SystemExit(1)) is None and signal_of(RuntimeError()) is None


def test_resume_command_replaces_the_checkpoint_and_quotes() -> None:
    overrides = ["experiment=bert_to_tiny", "ckpt_path=/old/last.ckpt", "tags=[a, b]"]
    command = resume_command(overrides, Path("/runs/x/checkpoints/last.ckpt"))
    assert command == (
        "python -m distill.train experiment=bert_to_tiny 'tags=[a, b]' ckpt_path=/runs/x/checkpoints/last.ckpt"
    )
    assert resume_command(["+ckpt_path=/a"], None) == "python -m distill.train"


def interrupted_run(overrides: list[str], tmp_path: Path, signum: signal.Signals) -> tuple[int, list[str]]:
    """Starts `python -m distill.train` with a long fit, sends ``signum`` once last.ckpt exists."""
    long_fit = ["trainer.max_steps=100000", "trainer.max_epochs=1000"]
    overrides = [o for o in overrides if not o.startswith("trainer.max_steps=")] + long_fit
    output = tmp_path / "output.log"
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    with output.open("w") as sink:
        command = [sys.executable, "-m", "distill.train", *overrides]
        process = subprocess.Popen(command, cwd=repo, env=env, stdout=sink, stderr=subprocess.STDOUT)
        last = tmp_path / "run" / "checkpoints" / "last.ckpt"
        deadline = time.monotonic() + 300
        while not last.is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert process.poll() is None, output.read_text()[-3000:]
        process.send_signal(signum)
        code = process.wait(timeout=120)
    return code, [line for line in output.read_text().splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_fit_exits_non_zero_and_says_how_to_resume(
    tiny_run_overrides: list[str], tmp_path: Path, signum: signal.Signals
) -> None:
    code, lines = interrupted_run(tiny_run_overrides, tmp_path, signum)
    assert code == 128 + signum, "\n".join(lines[-40:])
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["complete"] is False
    assert metrics["reason"].startswith(f"{signum.name} during fit at step ") and metrics["global_step"] >= 3
    last = run / "checkpoints" / "last.ckpt"
    assert lines[-1].split("resume: ", 1)[1].endswith(f"ckpt_path={last}"), lines[-1]
    assert "paths.output_dir=" in lines[-1] and "trainer.max_steps=100000" in lines[-1]
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["global_step"] >= 3
    if signum == signal.SIGTERM:  # saved afresh at the step the run stopped at
        assert saved["global_step"] == metrics["global_step"]
    assert not list((run / "checkpoints").glob("*.tmp-*"))
