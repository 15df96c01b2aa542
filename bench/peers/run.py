"""One arm of the peer bench: distill's recipe trained by distill, by TRL or by a plain loop, then scored alike.

    python -m bench.peers.run --arm {distill,trl,plain} --seed 42 [--blocks 8 --eval-blocks 2] [override ...]

Each arm trains in a process of its own, launched here: ``python -m distill.train experiment=smollm2_to_small``
(the store of the teacher's top-64 logits built in the run, unless ``--store`` names one to share) or
``python -m bench.peers.loops trl|plain``. All start from the same student (:mod:`bench.peers.student`) and
train on the same blocks in the same order. The training process reports when fit started and ended, the
blocks and targets it trained on and its peak memory at that point; this process adds its own launch time
and the child's whole rusage, then scores the saved student with distill's held-out perplexity and writes
``<out>/<arm>-seed<seed>.json``. Trailing Hydra overrides apply to every arm (e.g. ``distill.alpha=0``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM

from bench.peers.common import (
    EXPERIMENT,
    REPO,
    RESULTS,
    Recipe,
    compose_experiment,
    cpu,
    heldout,
    order_digest,
    size_overrides,
    versions,
    write_record,
)
from bench.peers.student import ensure_student

ARMS = ("distill", "trl", "plain")
# What the record copies from distill's own metrics.json: its stages' times and its own scores.
DISTILL_METRICS = (
    "energy/logit_store_seconds",
    "energy/teacher_stage_seconds",
    "teacher_store/bytes_per_token",
    "student/test_ppl",
    "teacher/test_ppl",
    "wall_time_s",
)


def distill_command(
    seed: int, student: Path, work: Path, store: Path, data_cache: str, overrides: list[str], sweep: bool = False
) -> list[str]:
    """The distill arm's command; with ``sweep``, one ``-m`` process whose jobs run in ``<work>/sweep/<k>`` and
    write ``<work>/facts-<k>.json``."""
    folders = (
        (f"hydra.sweep.dir={work / 'sweep'}", f"+callbacks.bench_facts.path={work}/facts-${{hydra:job.num}}.json")
        if sweep
        else (f"hydra.run.dir={work / 'run'}", f"+callbacks.bench_facts.path={work / 'facts.json'}")
    )
    return [
        *(sys.executable, "-m", "distill.train", *(["-m"] * sweep), f"experiment={EXPERIMENT}", f"seed={seed}"),
        *("student=pretrained", f"student.name_or_path={student}"),
        # Scored, as the other arms, after every block: no mid-run validation, no best-checkpoint pick, no
        # checkpoint writes, no test before fit.
        *("evaluate_before_fit=false", "trainer.limit_val_batches=0", "callbacks.model_checkpoint=null"),
        *("+trainer.enable_checkpointing=false", "logger=csv", "trainer.enable_progress_bar=false"),
        *overrides,
        # The store lives in paths.cache_dir; the tokenized corpus stays in the shared cache, as for the others.
        *(f"paths.cache_dir={store}", f"data.cache_dir={data_cache}"),
        "+callbacks.bench_facts._target_=bench.peers.fit_timer.FitTimer",
        *folders,
    ]


def loop_command(arm: str, seed: int, student: Path, work: Path, overrides: list[str]) -> list[str]:
    files = ("--student", str(student), "--save", str(work / "student"), "--facts", str(work / "facts.json"))
    return [sys.executable, "-m", "bench.peers.loops", arm, "--seed", str(seed), *files, *overrides]


def launch(command: list[str]) -> dict[str, float]:
    """Run ``command`` from the repository; its launch time, wall time and peak RSS (its own rusage, children
    included, not this process's other children's)."""
    launched = time.time()
    process = subprocess.Popen(command, cwd=REPO)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, shlex.join(command))
    return {"launched": launched, "process_s": time.time() - launched, "peak_rss_process_mb": usage.ru_maxrss / 1024}


def measured(facts: dict[str, Any], process: dict[str, float]) -> dict[str, Any]:
    wall = facts["train_end"] - process["launched"]
    train = facts["train_end"] - facts["train_start"]
    return {
        "steps": facts["steps"],
        "tokens": facts["tokens"],
        "order_digest": order_digest(facts["order"]),
        # Launch to the end of training: interpreter, imports, loading, the store (distill), training.
        # Milliseconds kept: a smoke run's two steps take a few of them.
        "wall_s": round(wall, 3),
        "train_s": round(train, 3),
        "train_tokens_per_s": round(facts["tokens"] / train, 1),
        "wall_tokens_per_s": round(facts["tokens"] / wall, 1),
        "peak_rss_mb": round(facts["peak_rss_mb"]),  # the training process, at the end of training
        "process_s": round(process["process_s"], 3),  # the whole process, distill's own test and export included
        "peak_rss_process_mb": round(process["peak_rss_process_mb"]),
    }


def run(arm: str, seed: int, blocks: int | None, eval_blocks: int | None, out: Path, overrides: list[str],
        student: Path | None = None, store: Path | None = None, keep: bool = False) -> dict[str, Any]:  # fmt: skip
    student = student or ensure_student(seed, overrides)
    work = out / "work" / f"{arm}-seed{seed}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sized = [*size_overrides(blocks, eval_blocks), *overrides]
    cfg = compose_experiment(seed, sized)
    if arm == "distill":
        command = distill_command(seed, student, work, store or work / "cache", cfg.data.cache_dir, sized)
    else:
        command = loop_command(arm, seed, student, work, sized)
    process = launch(command)
    facts = json.loads((work / "facts.json").read_text())
    trained = work / "run" / "student" if arm == "distill" else work / "student"
    size = {"blocks": blocks, "eval_blocks": eval_blocks}
    record = scored(arm, seed, size, overrides, cfg, facts, process, trained, command, student)
    write_record(out / f"{arm}-seed{seed}.json", record)
    if not keep:  # the trained students (330 MB each) and a store of the run's own
        shutil.rmtree(trained, ignore_errors=True)
        shutil.rmtree(work / "cache", ignore_errors=True)
    return record


def scored(arm: str, seed: int, size: dict[str, int | None], overrides: list[str], cfg: DictConfig,
           facts: dict[str, Any], process: dict[str, float], trained: Path, command: list[str],
           student: Path) -> dict[str, Any]:  # fmt: skip
    """The record of one trained student (distill's in ``trained``, beside its run's metrics.json): what its
    training process reported, timed from ``process["launched"]``, and its held-out perplexity."""
    datamodule = instantiate(cfg.data)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    record = {
        "arm": arm,
        "seed": seed,
        "size": "experiment" if set(size.values()) == {None} else "smoke",
        **size,
        "overrides": overrides,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **measured(facts, process),
        **heldout(AutoModelForCausalLM.from_pretrained(trained).to(device), datamodule),
        "loss": facts.get("loss", "distill: alpha * CE + (1 - alpha) * T^2 * KL against the stored top-64 + rest"),
        "recipe": facts.get("recipe", asdict(Recipe.of(cfg))),  # TRL's says what its loss can do
        "student_init": str(student),
        "command": shlex.join(command),
        "versions": versions(),
        "cpu": cpu(),
    }
    if arm == "distill":
        metrics = json.loads((trained.parent / "metrics.json").read_text())
        record["distill_metrics"] = {key: metrics.get(key) for key in DISTILL_METRICS}
    return record


def bench_arguments(description: str) -> argparse.ArgumentParser:
    """The options a run and a sweep share."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--blocks", type=int, help="train on the first N of the experiment's blocks (smoke runs)")
    parser.add_argument("--eval-blocks", type=int, help="score on the first N held-out blocks (smoke runs)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--student", type=Path, help="the initial student's folder (default: the seed's cut)")
    parser.add_argument("--store", type=Path, help="distill: a cache folder whose teacher store runs share")
    parser.add_argument("--keep", action="store_true", help="keep the trained students and the run's store")
    return parser


def main() -> None:
    parser = bench_arguments(__doc__.splitlines()[0])
    parser.add_argument("--arm", choices=ARMS, required=True)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every arm (e.g. distill.alpha=0)")
    args = parser.parse_intermixed_args()
    record = run(
        args.arm, args.seed, args.blocks, args.eval_blocks, args.out, args.overrides, args.student, args.store,
        args.keep,
    )  # fmt: skip
    summary = ("wall_s", "train_s", "train_tokens_per_s", "peak_rss_mb", "heldout_ppl", "order_digest")
    print(json.dumps({key: record[key] for key in ("arm", "seed", *summary)}))


if __name__ == "__main__":
    main()
