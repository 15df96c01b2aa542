"""SLURM preemption: checkpoint at a step every rank agrees on, requeue the job, exit.

Lightning's own auto-requeue saves its checkpoint inside the signal handler. A Python handler runs
between two bytecodes of whatever the main thread was doing, so under DDP one rank can be in the
handler's checkpoint barrier while another still waits in a gradient all-reduce: the collectives
never pair up and the job hangs, without a checkpoint, until SLURM kills it (Lightning issue
#21406; it hung our 2-rank CPU test job intermittently). Here the handler only records the
signal. At a training-batch boundary the ranks agree whether any of them got it; then all save
``hpc_ckpt_<n>.ckpt`` in the run folder (the file Lightning resumes from when the requeued job
starts again), rank 0 requeues the job and every rank exits.

Installed only inside a SLURM job (``SLURMEnvironment.detect()``), from the start of training to
its end, over the handler Lightning registered; Lightning's teardown then restores the one from
before ``fit``.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment

log = logging.getLogger(__name__)


class SlurmRequeued(SystemExit):
    """Ends a rank after the checkpoint was written and the job requeued; exit status 0."""

    def __init__(self) -> None:
        super().__init__(0)


def next_hpc_checkpoint(run_dir: str | Path) -> Path:
    """``hpc_ckpt_<n+1>.ckpt`` after the highest ``n`` in ``run_dir``: Lightning resumes from the highest."""
    names = (path.name for path in Path(run_dir).glob("hpc_ckpt_*.ckpt"))
    numbers = [int(match.group(1)) for name in names if (match := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", name))]
    return Path(run_dir) / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


def slurm_job_id() -> str:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for an array task."""
    if (array_job := os.environ.get("SLURM_ARRAY_JOB_ID")) is not None:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


def requeue(command_prefix: Sequence[str], checkpoint: Path) -> None:
    command = [*command_prefix, slurm_job_id()]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
        problem = f"failed ({result.returncode}): {result.stderr.strip()}" if result.returncode else None
    except OSError as error:  # e.g. scontrol missing inside a container
        problem = f"could not run: {error}"
    if problem:
        raise RuntimeError(f"{' '.join(command)} {problem}; resume by hand with ckpt_path={checkpoint}")
    log.info("Requeued SLURM job %s; the restart resumes from %s", command[-1], checkpoint)


class SlurmRequeue(pl.Callback):
    """On ``signal_name`` (the templates' ``--signal=SIGUSR1@90``): checkpoint, requeue, exit.

    Args:
        signal_name: the signal SLURM sends before the time limit.
        check_every_n_steps: how often the ranks compare notes. The check is one tiny all-reduce
            (and a device sync); the signal's lead time must cover this many steps plus the save.
        requeue_command: run with the job id appended, on rank 0; replace it where ``scontrol``
            is not on the compute nodes' PATH (containers).
    """

    def __init__(
        self,
        signal_name: str = "SIGUSR1",
        check_every_n_steps: int = 10,
        requeue_command: Sequence[str] = ("scontrol", "requeue"),
    ) -> None:
        if signal_name not in signal.Signals.__members__:
            raise ValueError(f"slurm_requeue.signal_name={signal_name!r} is not a signal name (e.g. 'SIGUSR1')")
        if check_every_n_steps < 1:
            raise ValueError(f"slurm_requeue.check_every_n_steps={check_every_n_steps} must be at least 1")
        self.signum = signal.Signals[signal_name]
        self.check_every_n_steps = check_every_n_steps
        self.requeue_command = list(requeue_command)
        self.signalled = False
        self._previous_handler = None
        self._installed = False

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.signalled = True  # nothing else: the main thread may be anywhere, even inside a collective

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not SLURMEnvironment.detect():
            return
        self._previous_handler = signal.signal(self.signum, self._record)
        self._installed = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        if not self._installed or trainer.global_step % self.check_every_n_steps:
            return
        if trainer.strategy.reduce_boolean_decision(self.signalled, all=False):
            self._checkpoint_and_requeue(trainer)

    def _checkpoint_and_requeue(self, trainer: pl.Trainer) -> None:
        path = next_hpc_checkpoint(trainer.default_root_dir)
        trainer.save_checkpoint(path)  # every rank takes part; ends with a barrier
        if trainer.is_global_zero:
            log.info("%s: saved %s at step %d", self.signum.name, path, trainer.global_step)
            requeue(self.requeue_command, path)
        raise SlurmRequeued

    def _restore(self) -> None:
        if self._installed:
            # None: the previous handler was not set from Python; SIG_DFL is the closest we can restore.
            signal.signal(self.signum, self._previous_handler if self._previous_handler is not None else signal.SIG_DFL)
            self._installed = False

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()
