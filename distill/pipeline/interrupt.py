"""A run ended by a signal says so: exit status 128 + signal, an incomplete metrics.json, how to resume.

Lightning turns SIGTERM during ``fit``/``test`` into ``SIGTERMException``, a ``SystemExit`` with no code, so
the process would exit 0 and a scheduler, a sweep or ``cmd && next`` would take the killed run for a success.
SIGINT raises ``KeyboardInterrupt``, which Lightning catches and turns into ``sys.exit(1)``. Both are turned
here into :class:`Interrupted`, whose status is what a shell reports for a process killed by that signal
(143 for SIGTERM, 130 for SIGINT). Outside ``fit``/``test`` no handler is installed: the signal kills the
process and the shell sees the same status.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from distill.utils.run_record import write_json

log = logging.getLogger(__name__)


def exit_code(signum: int) -> int:
    """The status a shell gives a process killed by ``signum``: schedulers and ``&&`` read it as a failure."""
    return 128 + signum


def signal_of(error: BaseException) -> signal.Signals | None:
    """The signal that ``error`` stands for, or None for any other failure."""
    if isinstance(error, SIGTERMException):
        return signal.SIGTERM
    # Lightning answers Ctrl-C with sys.exit(1) from inside its `except KeyboardInterrupt`, which leaves the
    # KeyboardInterrupt as the SystemExit's context.
    if isinstance(error, KeyboardInterrupt) or (
        isinstance(error, SystemExit) and isinstance(error.__context__, KeyboardInterrupt)
    ):
        return signal.SIGINT
    return None


class Interrupted(SystemExit):
    """The run was stopped by ``signum``; exits with :func:`exit_code`. Hydra lets a ``SystemExit`` through."""

    def __init__(self, signum: signal.Signals, stage: str, step: int, checkpoint: Path | None) -> None:
        super().__init__(exit_code(signum))
        self.signum = signum
        self.reason = f"{signum.name} during {stage} at step {step}"
        self.checkpoint = checkpoint


def last_checkpoint(trainer: pl.Trainer) -> Path | None:
    """``last.ckpt`` of the run's ModelCheckpoint, where one was saved."""
    callback = trainer.checkpoint_callback
    if callback is None or callback.dirpath is None:
        return None
    path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
    return path if path.is_file() else None


@contextmanager
def stops_on_signal(trainer: pl.Trainer, output_dir: Path, known: Mapping[str, Any]) -> Iterator[None]:
    """Around ``fit`` and ``test``: a signal becomes :class:`Interrupted` after rank 0 wrote an incomplete
    metrics.json with ``known`` metrics, the step and the last values logged."""
    try:
        yield
    except BaseException as error:
        signum = signal_of(error)
        if signum is None:
            raise
        stage = trainer.state.fn.value if trainer.state.fn is not None else "fit"
        stopped = Interrupted(signum, stage, trainer.global_step, last_checkpoint(trainer))
        if trainer.is_global_zero:
            logged = {key: value.item() for key, value in trainer.callback_metrics.items() if value.numel() == 1}
            metrics = {"complete": False, "reason": stopped.reason, "global_step": trainer.global_step}
            write_json(output_dir / "metrics.json", metrics | dict(known) | logged)
        log.warning("Stopped: %s; metrics.json is marked incomplete", stopped.reason)
        raise stopped from error


def resume_command(overrides: Sequence[str], checkpoint: Path | None) -> str:
    """The command line that goes on from ``checkpoint``: the run's overrides, its ``ckpt_path`` replaced."""
    kept = [override for override in overrides if not override.lstrip("+~").startswith("ckpt_path=")]
    resumed = [*kept, f"ckpt_path={checkpoint}"] if checkpoint is not None else kept
    return shlex.join(["python", "-m", "distill.train", *resumed])


@contextmanager
def says_how_to_resume() -> Iterator[None]:
    """Outermost in ``main``: after everything else was logged, the last line of an interrupted run is how to
    resume it (without a checkpoint, how to start it again)."""
    try:
        yield
    except Interrupted as stopped:
        overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
        log.info("resume: %s", resume_command(overrides, stopped.checkpoint))
        raise


class LastCheckpointOnSigterm(pl.Callback):
    """On SIGTERM during ``fit``, saves ``last.ckpt`` at the step the run stopped at.

    Lightning raises ``SIGTERMException`` only at a batch boundary, so the state is a consistent one, like
    ModelCheckpoint's own saves. The file is written beside ``last.ckpt`` and renamed over it: a second kill
    during the save leaves the previous ``last.ckpt`` whole. Single process only: under DDP the ranks need not
    stop at the same step, and the save's barrier would hang; there the last ModelCheckpoint save stands.
    """

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        callback = trainer.checkpoint_callback
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        if trainer.world_size != 1 or callback is None or callback.dirpath is None:
            return
        path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            trainer.save_checkpoint(partial)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)  # left only by a failed save
        log.info("SIGTERM: saved %s at step %d", path, trainer.global_step)
