"""A run ended by a signal says so: exit status 128 + signal, an incomplete metrics.json, how to resume.

Lightning turns SIGTERM during ``fit``/``test`` into ``SIGTERMException``, a ``SystemExit`` with no code, so
the process would exit 0 and a scheduler, a sweep or ``cmd && next`` would take the killed run for a success.
SIGINT raises ``KeyboardInterrupt``, which Lightning catches and turns into ``sys.exit(1)``. Both are turned
here into :class:`Interrupted`, whose status is what a shell reports for a process killed by that signal
(143 for SIGTERM, 130 for SIGINT). Outside ``fit``/``test`` (the teacher stage and the stores of
``distill.train``, and the commands without a Trainer: prune, quantize, generate, eval, serve_bench,
export_gguf) :func:`ends_on_signal` makes SIGTERM an exception too, so that ``finally`` blocks remove
partial files and stop servers, and the run ends the same way: an incomplete metrics.json, the same
status, and a last line that says how to go on.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
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

    def __init__(self, signum: signal.Signals, reason: str, checkpoint: Path | None = None) -> None:
        super().__init__(exit_code(signum))
        self.signum = signum
        self.reason = reason
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
        reason = f"{signum.name} during {stage} at step {trainer.global_step}"
        stopped = Interrupted(signum, reason, last_checkpoint(trainer))
        if trainer.is_global_zero:
            logged = {key: value.item() for key, value in trainer.callback_metrics.items() if value.numel() == 1}
            metrics = {"complete": False, "reason": stopped.reason, "global_step": trainer.global_step}
            write_json(output_dir / "metrics.json", metrics | dict(known) | logged)
        log.warning("Stopped: %s; metrics.json is marked incomplete", stopped.reason)
        raise stopped from error


def resume_command(overrides: Sequence[str], checkpoint: Path | None, command: str = "distill.train") -> str:
    """The command line that goes on from ``checkpoint``: the run's overrides, its ``ckpt_path`` replaced."""
    kept = [override for override in overrides if not override.lstrip("+~").startswith("ckpt_path=")]
    resumed = [*kept, f"ckpt_path={checkpoint}"] if checkpoint is not None else kept
    return shlex.join(["python", "-m", command, *resumed])


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """The SIGTERM handler outside fit/test. Inside them Lightning installs its own, which calls the handlers it
    found (this one) too: then this one must do nothing, and Lightning stops at the next batch boundary, where
    the state is whole and every rank stops at the same step."""
    if signal.getsignal(signal.SIGTERM) is _raise_on_sigterm:
        raise SIGTERMException  # Lightning's own, so that signal_of treats both alike


@contextmanager
def ends_on_signal(command: str, output_dir: Path, resumes: bool = False) -> Iterator[None]:
    """Outermost in an entry point: SIGTERM raises, and a run stopped by a signal writes an incomplete
    metrics.json (rank 0; unless fit/test already did), exits 128 + signal and ends with the command that
    goes on. ``resumes``: a run started again picks up where it stopped (finished shards, cached stages)."""
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        yield
    except BaseException as error:
        stopped = error if isinstance(error, Interrupted) else _stopped_outside_fit(error, command, output_dir)
        if stopped is None:
            raise
        overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
        label = "resume" if resumes or stopped.checkpoint is not None else "run again"
        log.info("%s: %s", label, resume_command(overrides, stopped.checkpoint, command))
        raise stopped from error
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stopped_outside_fit(error: BaseException, command: str, output_dir: Path) -> Interrupted | None:
    signum = signal_of(error)
    if signum is None:
        return None
    stopped = Interrupted(signum, f"{signum.name} during {command.removeprefix('distill.')}")
    if rank_zero_only.rank == 0:
        write_json(output_dir / "metrics.json", {"complete": False, "reason": stopped.reason})
    log.warning("Stopped: %s; metrics.json is marked incomplete", stopped.reason)
    return stopped


class LastCheckpointOnSigterm(pl.Callback):
    """On SIGTERM during ``fit``, every rank stops at the same step and ``last.ckpt`` is saved there.

    Lightning's own SIGTERM handler broadcasts from inside the handler. A Python handler runs between two
    bytecodes of whatever the main thread was doing, so under DDP one rank's handler broadcast can meet
    another rank's gradient all-reduce or checkpoint all-gather: the collectives never pair up and the job
    hangs until the scheduler kills it (seen in our 2-rank SLURM test). From the start of training to its end
    the handler here only records the signal; at each training-batch end the ranks agree, with one tiny
    all-reduce, whether any of them got it, and all of them set Lightning's flag together, so Lightning raises
    ``SIGTERMException`` on every rank after the same step. The save is then a consistent one, like
    ModelCheckpoint's own: written beside ``last.ckpt`` and renamed over it, so a second kill during the save
    leaves the previous ``last.ckpt`` whole.
    """

    def __init__(self) -> None:
        self.signalled = False
        self._previous_handler: Any = None
        self._installed = False

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.signalled = True  # nothing else: the main thread may be anywhere, even inside a collective

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.signalled = False
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._record)
            self._installed = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._agree(trainer)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # One process stops mid-validation. Ranks may run different numbers of validation batches (a streamed
        # split), where a collective per batch would hang them: they agree at the next training batch instead.
        if trainer.world_size == 1:
            self._agree(trainer)

    def _agree(self, trainer: pl.Trainer) -> None:
        if not self._installed:
            return
        agreed = self.signalled
        if trainer.world_size > 1:
            agreed = trainer.strategy.reduce_boolean_decision(self.signalled, all=False)
        if agreed and not trainer.received_sigterm:
            log.info("SIGTERM: every rank stops after step %d", trainer.global_step)
            trainer._signal_connector.received_sigterm = True  # Lightning raises SIGTERMException after this hook

    def _restore(self) -> None:
        if self._installed:
            signal.signal(
                signal.SIGTERM, self._previous_handler if self._previous_handler is not None else signal.SIG_DFL
            )
            self._installed = False

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()
        callback = trainer.checkpoint_callback
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        if callback is None or callback.dirpath is None:
            return
        path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        if trainer.world_size > 1:
            partial = trainer.strategy.broadcast(partial)  # one file, written by rank 0
        try:
            trainer.save_checkpoint(partial)  # every rank takes part; ends with a barrier
            if trainer.is_global_zero:
                os.replace(partial, path)
        finally:
            if trainer.is_global_zero:
                partial.unlink(missing_ok=True)  # left only by a failed save
        log.info("SIGTERM: saved %s at step %d", path, trainer.global_step)
