"""SlurmRequeue in one process: the signal handler only records, the batch boundary saves and requeues.

The 2-rank version on a real cluster is tests/test_slurm.py::test_usr1_requeues_and_resumes_at_the_saved_step.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from distill.callbacks.slurm_requeue import SlurmRequeue, SlurmRequeued, next_hpc_checkpoint
from tests.callback_helpers import batches, make_trainer, tiny_module

pytestmark = pytest.mark.slurm

SIGNAL_AT_STEP = 3


class SignalAtStep(SlurmRequeue):
    """Sends itself the signal inside a training step, as `scancel --signal=USR1` would."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == SIGNAL_AT_STEP:
            os.kill(os.getpid(), self.signum)
            assert self.signalled  # the handler ran, and did nothing else:
            assert not any(Path(trainer.default_root_dir).glob("hpc_ckpt_*"))


@pytest.fixture
def in_slurm_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NAME", "distill")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)


def recording_command(tmp_path: Path) -> list[str]:
    """A stand-in for `scontrol requeue` that writes the job id it was given."""
    script = tmp_path / "requeue.py"
    script.write_text(f"import sys; open({str(tmp_path / 'requeued')!r}, 'w').write(sys.argv[1])")
    return [sys.executable, str(script)]


def test_signal_saves_at_the_next_check_requeues_and_exits(tmp_path: Path, in_slurm_job) -> None:
    before = signal.getsignal(signal.SIGUSR1)
    callback = SignalAtStep(check_every_n_steps=2, requeue_command=recording_command(tmp_path))
    trainer = make_trainer(tmp_path, [callback], max_steps=20)
    with pytest.raises(SystemExit) as exit_info:
        trainer.fit(tiny_module(), train_dataloaders=batches(count=64))
    assert isinstance(exit_info.value, SlurmRequeued) and exit_info.value.code == 0
    # Signalled during step 3's batch; the first check after it is at global_step 4.
    saved = torch.load(tmp_path / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 4
    assert (tmp_path / "requeued").read_text() == "4242"
    assert signal.getsignal(signal.SIGUSR1) is before


def test_the_restart_resumes_from_the_saved_step(tmp_path: Path, in_slurm_job) -> None:
    callback = SignalAtStep(check_every_n_steps=1, requeue_command=recording_command(tmp_path))
    with pytest.raises(SlurmRequeued):
        make_trainer(tmp_path, [callback], max_steps=10).fit(tiny_module(), train_dataloaders=batches(count=64))
    restarted = make_trainer(tmp_path, [SlurmRequeue()], max_steps=10)
    restarted.fit(tiny_module(), train_dataloaders=batches(count=64))  # no ckpt_path: Lightning finds hpc_ckpt_1
    assert restarted.global_step == 10
    assert next_hpc_checkpoint(tmp_path).name == "hpc_ckpt_2.ckpt"


@pytest.mark.parametrize(
    ("command", "message"),
    [([sys.executable, "-c", "raise SystemExit(3)"], r"failed \(3\)"), (["no-such-scontrol"], "could not run")],
)
def test_a_failed_requeue_names_the_command_and_the_checkpoint(
    tmp_path: Path, in_slurm_job, command: list[str], message: str
) -> None:
    callback = SignalAtStep(check_every_n_steps=1, requeue_command=command)
    with pytest.raises(RuntimeError, match=rf"{message}.*ckpt_path=.*hpc_ckpt_1\.ckpt"):
        make_trainer(tmp_path, [callback], max_steps=10).fit(tiny_module(), train_dataloaders=batches(count=64))
    assert (tmp_path / "hpc_ckpt_1.ckpt").is_file()


def test_outside_slurm_no_handler_is_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    before = signal.getsignal(signal.SIGUSR1)
    seen = []

    class Probe(SlurmRequeue):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            seen.append(signal.getsignal(signal.SIGUSR1))

    make_trainer(tmp_path, [Probe()], max_steps=2).fit(tiny_module(), train_dataloaders=batches())
    assert seen and all(handler is before for handler in seen)


def test_array_tasks_requeue_by_array_id(monkeypatch: pytest.MonkeyPatch) -> None:
    from distill.callbacks.slurm_requeue import slurm_job_id

    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    assert slurm_job_id() == "70_7"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"signal_name": "SIGUSR3"}, "signal_name='SIGUSR3'"), ({"check_every_n_steps": 0}, "check_every_n_steps=0")],
)
def test_bad_settings_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SlurmRequeue(**kwargs)
