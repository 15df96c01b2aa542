"""The initial student every arm starts from: distill's depth-pruned cut of the teacher, saved once per seed.

    python -m bench.peers.student --seed 42 [override ...]

It is the student ``python -m distill.train experiment=smollm2_to_small seed=<seed>`` builds (the calibration
batch, and so the kept layers, depend on the seed), made by the same config and builder and reused from
distill's own pruned-student cache when a run has cut it already. The bench keeps it as a Hugging Face folder
with the teacher's tokenizer, which ``student=pretrained`` (distill's arm), TRL and the plain loop all load.
The folder's name is keyed by the composed ``teacher``, ``data`` and ``student`` settings and the seed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import OmegaConf

from bench.peers.common import compose_experiment
from distill.utils.keys import digest
from distill.utils.references import default_cache_dir
from distill.utils.scratch import written_whole


def student_dir(seed: int, overrides: list[str]) -> Path:
    cfg = compose_experiment(seed, overrides)
    settings = {group: OmegaConf.to_container(cfg[group], resolve=True) for group in ("teacher", "data", "student")}
    return default_cache_dir() / "bench_peers" / f"student-seed{seed}-{digest([settings, seed])[:12]}"


def build_student(seed: int, overrides: list[str], target: Path) -> None:
    """Cut the experiment's student as distill.train does (seeded the same way) and save it with its tokenizer."""
    cfg = compose_experiment(seed, overrides)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    task = instantiate(cfg.task)
    teacher = instantiate(cfg.teacher, datamodule=datamodule, task=task)
    pl.seed_everything(cfg.seed, workers=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    with written_whole(target) as scratch:
        # pruning.json: the kept layers and their scores, copied from distill's cache
        student = instantiate(
            cfg.student, teacher=teacher, datamodule=datamodule, report_path=str(scratch / "pruning.json")
        )
        student.save_pretrained(scratch)
        datamodule.tokenizer.save_pretrained(scratch)
        source = {"seed": seed, "overrides": overrides, "student": OmegaConf.to_container(cfg.student, resolve=True)}
        (scratch / "bench_source.json").write_text(json.dumps(source, indent=2))


def ensure_student(seed: int, overrides: list[str]) -> Path:
    """The seed's student folder, cut first (in its own process, so no arm's memory or time holds it) if new."""
    target = student_dir(seed, overrides)
    if not (target / "config.json").is_file():
        command = [sys.executable, "-m", "bench.peers.student", "--seed", str(seed), *overrides]
        subprocess.run(command, check=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the experiment (teacher, data, student)")
    args = parser.parse_intermixed_args()
    target = student_dir(args.seed, args.overrides)
    if not (target / "config.json").is_file():
        build_student(args.seed, args.overrides, target)
    print(target)


if __name__ == "__main__":
    main()
