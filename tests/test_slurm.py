"""On a real (local, single-node) SLURM cluster: 2-rank DDP and FSDP jobs through the project's sbatch
template, USR1 preemption with requeue and resume, and a Hydra multirun through the submitit
launcher followed by the frontier report.

The cluster comes from ``SLURM_CONF`` when one answers (``.ci/run`` starts it once per CI run);
otherwise, as root, the session starts one with ``launch/local_cluster.sh`` and stops it after.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import require

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "PREEMPTED"}


def cluster_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    return result.returncode == 0 and any(state in result.stdout for state in ("idle", "mix", "alloc"))


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    if cluster_answers():
        yield
        return
    require(os.geteuid() == 0, "no SLURM cluster answers and starting one needs root")
    state = tmp_path_factory.mktemp("slurm-state")
    env = {**os.environ, "SLURM_DIR": str(state), "SLURM_CONF": str(state / "slurm.conf")}
    up = subprocess.run([str(REPO / "launch" / "local_cluster.sh"), "up"], env=env, capture_output=True, text=True)
    require(up.returncode == 0, f"launch/local_cluster.sh up failed: {up.stderr[-2000:]}")
    os.environ["SLURM_CONF"] = env["SLURM_CONF"]
    yield
    subprocess.run([str(REPO / "launch" / "local_cluster.sh"), "down"], env=env, check=False)


def job_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return next((part.split("=", 1)[1] for part in out.split() if part.startswith("JobState=")), "UNKNOWN")


def wait_for(job_id: str, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(job_id)
        if state in TERMINAL:
            return state
        time.sleep(1)
    subprocess.run(["scancel", job_id], check=False)
    return "TEST_TIMEOUT"


def tiny_overrides(tmp_path: Path, teacher_dir: Path, steps: int, val_every: int) -> list[str]:
    return [
        f"paths.log_dir={tmp_path / 'logs'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"teacher.name_or_path={teacher_dir}",
        "teacher.finetune_settings.max_steps=4",
        "student.layers=[1]",
        "data.train_limit=2000",
        "data.val_limit=64",
        "data.max_length=32",
        f"trainer.max_steps={steps}",
        "trainer.max_epochs=-1",
        f"trainer.val_check_interval={val_every}",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
        "logger=csv",
    ]


def last_logged_step(run: Path) -> int:
    """The last optimizer step with a logged train/loss (the CSV logger's 0-based step)."""
    import csv

    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    return max(int(row["step"]) for row in rows if row.get("train/loss"))


def sbatch(tmp_path: Path, *overrides: str, trainer: str = "ddp_cpu") -> str:
    command = [
        "sbatch",
        "--parsable",
        "--gpus-per-node=0",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        "--time=00:15:00",
        f"--output={tmp_path / 'job-%j.out'}",
        str(REPO / "launch" / "single_node.sbatch"),
        f"trainer={trainer}",
        *overrides,
    ]
    # sbatch exports this environment to the job: a MASTER_PORT left by an earlier in-process DDP test would give
    # every job the same rendezvous port (two jobs at once: EADDRINUSE), where each job's own id would pick apart.
    stale = ("MASTER_PORT", "MASTER_ADDR", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")
    env = {key: value for key, value in os.environ.items() if key not in stale} | {"DISTILL_PYTHON": sys.executable}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.parametrize("trainer", ["ddp_cpu", "fsdp_cpu"])
def test_two_rank_job_through_the_template(
    trainer: str, slurm, tmp_path: Path, tiny_teacher_dir: Path, data_dir
) -> None:
    job = sbatch(tmp_path, *tiny_overrides(tmp_path, tiny_teacher_dir, steps=6, val_every=3), trainer=trainer)
    state = wait_for(job)
    output = (tmp_path / f"job-{job}.out").read_text()
    assert state == "COMPLETED", output[-4000:]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in output and "GLOBAL_RANK: 1, MEMBER: 2/2" in output
    assert ("FSDP: the student and the teacher sharded over 2 ranks" in output) == (trainer == "fsdp_cpu")
    run = tmp_path / "logs" / "train" / "runs" / job  # both ranks, one folder named by the job id
    assert (run / "metrics.json").is_file() and (run / "student" / "config.json").is_file()
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 6


@pytest.mark.parametrize("trainer", ["ddp_cpu", "fsdp_cpu"])
def test_usr1_requeues_and_resumes_at_the_saved_step(
    trainer: str, slurm, tmp_path: Path, tiny_teacher_dir: Path, data_dir
) -> None:
    overrides = tiny_overrides(tmp_path, tiny_teacher_dir, steps=400, val_every=20)
    job = sbatch(tmp_path, *overrides, trainer=trainer)
    # Beside it, the same job left alone: the requeued one must end where it does.
    straight = sbatch(tmp_path, *overrides, f"paths.log_dir={tmp_path / 'straight'}", trainer=trainer)
    run = tmp_path / "logs" / "train" / "runs" / job
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "last.ckpt").is_file() and time.monotonic() < deadline:
        time.sleep(0.5)  # training is under way (SlurmRequeue's USR1 handler is installed)
    assert job_state(job) == "RUNNING", (tmp_path / f"job-{job}.out").read_text()[-3000:]
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    state = wait_for(job)
    output = (tmp_path / f"job-{job}.out").read_text()
    assert state == "COMPLETED", output[-4000:]
    saved = torch.load(run / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert 0 < saved < 400
    assert f"Requeued SLURM job {job}; the restart resumes from {run / 'hpc_ckpt_1.ckpt'}" in output
    assert f"Restoring states from the checkpoint path at {run / 'hpc_ckpt_1.ckpt'}" in output
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 400
    assert last_logged_step(run) >= 399  # logging went on after the restart
    assert wait_for(straight) == "COMPLETED"
    uninterrupted = tmp_path / "straight" / "train" / "runs" / straight
    assert trained_outcome(run) == trained_outcome(uninterrupted)  # the loader's place and random state resumed


def trained_outcome(run: Path) -> dict:
    """What training decides in metrics.json: the student's test metrics and the step, not the clock's figures."""
    metrics = json.loads((run / "metrics.json").read_text())
    decided = {key: value for key, value in metrics.items() if key.startswith("student/") and "per_s" not in key}
    assert "student/val_acc" in decided and "student/agreement" in decided
    return decided | {"global_step": metrics["global_step"]}


@pytest.mark.sweep
@pytest.mark.concurrency
def test_submitit_multirun_and_frontier_report(slurm, tmp_path: Path, tiny_teacher_dir: Path, data_dir) -> None:
    sweep = tmp_path / "sweep"
    overrides = [o for o in tiny_overrides(tmp_path, tiny_teacher_dir, steps=6, val_every=3) if "log_dir" not in o]
    command = [
        sys.executable,
        "-m",
        "distill.train",
        "-m",
        "hydra/launcher=slurm_cpu",
        f"hydra.sweep.dir={sweep}",
        "distill.temperature=1,4",
        "compression=none,nm24",
        *overrides,
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert len(list(sweep.glob("*/metrics.json"))) == 4
    report = subprocess.run([sys.executable, "-m", "distill.report", str(sweep)], capture_output=True, text=True)
    assert report.returncode == 0, report.stderr[-3000:]
    table = (sweep / "frontier.md").read_text()
    assert sum(line.startswith("| ") and "compression=" in line for line in table.splitlines()) == 4
    assert (sweep / "frontier.png").stat().st_size > 10_000
    teachers = [p for p in (tmp_path / "cache" / "teachers").iterdir() if p.is_dir()]
    assert len(teachers) == 1  # four concurrent jobs, one fine-tuned teacher


def job_exit_code(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return next((part.split("=", 1)[1] for part in out.split() if part.startswith("ExitCode=")), "UNKNOWN")


@pytest.mark.parametrize(("name", "code"), [("TERM", 143), ("INT", 130)])
def test_a_signal_fails_the_job_with_128_plus_signal_and_leaves_a_resumable_run(
    name: str, code: int, slurm, tmp_path: Path, tiny_teacher_dir: Path, data_dir
) -> None:
    """SIGTERM is what SLURM sends at a time limit without --signal, at preemption and on `scancel`; SIGINT is
    `scancel --signal=INT` or Ctrl-C under `srun`. The job must not read as COMPLETED, and the run folder must
    say where it stopped and how to go on."""
    job = sbatch(tmp_path, *tiny_overrides(tmp_path, tiny_teacher_dir, steps=400, val_every=20))
    run = tmp_path / "logs" / "train" / "runs" / job
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.is_file() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert job_state(job) == "RUNNING", (tmp_path / f"job-{job}.out").read_text()[-3000:]
    subprocess.run(["scancel", f"--signal={name}", job], check=True)
    state = wait_for(job)
    output = (tmp_path / f"job-{job}.out").read_text()
    assert state == "FAILED" and job_exit_code(job) == f"{code}:0", output[-4000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["complete"] is False and metrics["reason"].startswith(f"SIG{name} during fit at step "), metrics
    saved = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert 0 < saved <= metrics["global_step"] < 400
    logged = [line for line in output.splitlines() if line.startswith("[")]  # not srun's own lines
    assert logged[-1].endswith(f"ckpt_path={last}"), output[-2000:]
