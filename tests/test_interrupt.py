"""A run ended by a signal exits 128 + signal, keeps its checkpoints and says so (distill/pipeline/interrupt.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from distill.pipeline.interrupt import Interrupted, ends_on_signal, exit_code, resume_command, signal_of


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


def default_sigint() -> None:
    """In the child, SIGINT as a terminal's Ctrl-C finds it: a test run started in the background (`pytest &`,
    a CI runner) inherits SIGINT ignored, and Python then never turns it into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupted_run(overrides: list[str], tmp_path: Path, signum: signal.Signals) -> tuple[int, list[str]]:
    """Starts `python -m distill.train` with a long fit, sends ``signum`` once last.ckpt exists."""
    long_fit = ["trainer.max_steps=100000", "trainer.max_epochs=1000"]
    overrides = [o for o in overrides if not o.startswith("trainer.max_steps=")] + long_fit
    output = tmp_path / "output.log"
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    with output.open("w") as sink:
        command = [sys.executable, "-m", "distill.train", *overrides]
        process = subprocess.Popen(
            command, cwd=repo, env=env, stdout=sink, stderr=subprocess.STDOUT, preexec_fn=default_sigint
        )
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


def test_sigterm_outside_fit_raises_cleans_up_and_exits_143(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    cleaned = []
    with pytest.raises(Interrupted) as stopped, ends_on_signal("distill.prune", tmp_path):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
        finally:
            cleaned.append(True)  # what a partial file's cleanup relies on
    assert stopped.value.code == 143 and cleaned == [True]
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"complete": False, "reason": "SIGTERM during prune"}
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigint_outside_fit_exits_130_and_other_errors_pass_through(tmp_path: Path) -> None:
    with pytest.raises(Interrupted) as stopped, ends_on_signal("distill.generate", tmp_path, resumes=True):
        raise KeyboardInterrupt
    assert stopped.value.code == 130 and stopped.value.reason == "SIGINT during generate"
    with pytest.raises(ValueError, match="bad"), ends_on_signal("distill.eval", tmp_path / "other"):
        raise ValueError("bad")
    assert not (tmp_path / "other" / "metrics.json").exists()


def test_inside_fit_the_handler_leaves_sigterm_to_lightning(tmp_path: Path) -> None:
    """Lightning keeps and calls the handler it finds: raising there would stop mid-step."""
    seen = []

    def lightnings_handler(signum, frame) -> None:
        seen.append(signum)
        outside(signum, frame)  # what Lightning's _HandlersCompose does with the handler it found

    with ends_on_signal("distill.train", tmp_path):
        outside = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, lightnings_handler)
        os.kill(os.getpid(), signal.SIGTERM)
        signal.signal(signal.SIGTERM, outside)
    assert seen == [signal.SIGTERM] and not (tmp_path / "metrics.json").exists()


# Runs an entry point with one of its long stages replaced by a signal to itself: the signal lands in that
# stage every time, where a timed kill would land anywhere.
STOPPED_IN_STAGE = """
import os, signal, sys
import distill.{command}
def stopped(*args, **kwargs):
    os.kill(os.getpid(), signal.{name})
    raise AssertionError("the signal did not stop the run")
distill.{command}.{stage} = stopped
sys.argv = ["distill.{command}", *sys.argv[1:]]
distill.{command}.cli()
"""


def stopped_in_stage(command: str, stage: str, signum: signal.Signals, overrides: list[str]) -> tuple[int, list[str]]:
    script = STOPPED_IN_STAGE.format(command=command, stage=stage, name=signum.name)
    command = [sys.executable, "-c", script, *overrides]
    result = subprocess.run(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300, preexec_fn=default_sigint
    )
    return result.returncode, [line for line in result.stdout.splitlines() if line.startswith("[")]


@pytest.mark.slow
def test_sigterm_in_the_logit_store_stage_of_train_ends_the_same_way(
    tiny_run_overrides: list[str], tmp_path: Path
) -> None:
    code, lines = stopped_in_stage("train", "teacher_logit_store", signal.SIGTERM, tiny_run_overrides)
    assert code == 143, "\n".join(lines[-30:])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics == {"complete": False, "reason": "SIGTERM during train"}
    assert lines[-1].split("resume: ", 1)[1].startswith("python -m distill.train "), lines[-1]
    assert "ckpt_path=" not in lines[-1]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_prune_exits_non_zero_and_says_how_to_go_on(
    signum: signal.Signals, prune_overrides: list[str], tmp_path: Path
) -> None:
    overrides = [*prune_overrides, "evaluate=false"]
    code, lines = stopped_in_stage("prune", "prune_oneshot", signum, overrides)
    assert code == 128 + signum, "\n".join(lines[-30:])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics == {"complete": False, "reason": f"{signum.name} during prune"}
    assert lines[-1].split("run again: ", 1)[1].startswith("python -m distill.prune paths.output_dir="), lines[-1]
    assert not (tmp_path / "run" / "model").exists()


class SigtermOnRankOne(pl.Callback):
    """Rank 1 alone gets SIGTERM before step ``at``: a signal reaches ranks apart, one mid-step while another
    is inside a collective."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_rank == 1 and trainer.global_step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
@pytest.mark.distributed
def test_sigterm_on_one_rank_stops_every_rank_after_the_same_step(
    tiny_run_overrides: list[str], tmp_path: Path
) -> None:
    """Lightning's handler broadcasts from inside the signal handler, which meets the other rank's gradient
    all-reduce or checkpoint all-gather and hangs the job; the ranks agree at the batch end instead."""
    overrides = [o for o in tiny_run_overrides if not o.startswith("trainer.max_steps=")]
    signal_rank_one = [f"+callbacks.sigterm._target_={__name__}.SigtermOnRankOne", "+callbacks.sigterm.at=4"]
    command = [
        sys.executable,
        "-m",
        "distill.train",
        *overrides,
        "trainer=ddp_cpu",
        "trainer.max_steps=40",
        "trainer.max_epochs=100",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([*command, *signal_rank_one], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == exit_code(signal.SIGTERM), done.stderr[-4000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["reason"] == "SIGTERM during fit at step 5", metrics
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 5
