"""A sweep of the distill arm as a user runs one: ``python -m distill.train -m`` over comma-separated overrides,
one process whose first job builds the teacher store and whose later jobs read it.

    python -m bench.peers.sweep --seed 43 [--store DIR] distill.alpha=0.5,0.3 distill.temperature=1,2 \\
        'distill.teacher_cache_temperatures=[2]'

Each job gets the record :mod:`bench.peers.run` writes for a run of its own, ``<out>/distill-seed<seed>-job<k>.json``,
with its swept values in ``overrides``. A job's ``wall_s`` runs, as a run of its own does, from the start of its
work to the end of its training: the first job's from the launch (interpreter, imports, the store build), each
later job's from the moment the job before it was done (its ``metrics.json`` written). The test, export and
scoring after each fit are left out, as they are for a run of its own; the imports are paid once.
``bench.peers.summary <out> --sweep <out>/distill-seed<seed>-job*.json`` totals them against TRL.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from bench.peers.common import compose_experiment, size_overrides, write_record
from bench.peers.run import bench_arguments, distill_command, launch, scored
from bench.peers.student import ensure_student

Record = dict[str, Any]


def swept(overrides: list[str]) -> list[str]:
    """The overrides that Hydra's basic sweeper expands (``key=a,b``), in order."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [text for text, override in zip(overrides, parsed, strict=True) if override.is_sweep_override()]


def job_values(run_dir: Path, keys: set[str]) -> list[str]:
    """The job's own values of the swept ``keys``, from the overrides Hydra saved in its folder."""
    saved = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "overrides.yaml"))
    return [text for text in saved if text.split("=", 1)[0] in keys]


def sweep(seed: int, blocks: int | None, eval_blocks: int | None, out: Path, overrides: list[str],
          student: Path | None = None, store: Path | None = None, keep: bool = False) -> list[Record]:  # fmt: skip
    varied = swept(overrides)
    if not varied:
        raise SystemExit(f"no swept override (key=a,b) among {overrides}: use bench.peers.run for one run")
    fixed = [text for text in overrides if text not in varied]
    student = student or ensure_student(seed, fixed)
    work = out / "work" / f"sweep-seed{seed}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sizes = size_overrides(blocks, eval_blocks)
    base = compose_experiment(seed, [*sizes, *fixed])
    store = store or work / "cache"
    command = distill_command(seed, student, work, store, base.data.cache_dir, [*sizes, *overrides], sweep=True)
    process = launch(command)
    keys = {text.split("=", 1)[0] for text in varied}
    jobs = sorted((path for path in (work / "sweep").iterdir() if path.name.isdigit()), key=lambda path: int(path.name))
    records, started = [], process["launched"]
    for run_dir in jobs:
        facts = json.loads((work / f"facts-{run_dir.name}.json").read_text())
        job = [*fixed, *job_values(run_dir, keys)]
        cfg = compose_experiment(seed, [*sizes, *job])
        size = {"blocks": blocks, "eval_blocks": eval_blocks}
        timed = process | {"launched": started}
        record = scored("distill", seed, size, job, cfg, facts, timed, run_dir / "student", command, student)
        record["sweep_job"] = int(run_dir.name)
        write_record(out / f"distill-seed{seed}-job{run_dir.name}.json", record)
        records.append(record)
        started = (run_dir / "metrics.json").stat().st_mtime  # the next job's work starts once this one is done
        if not keep:
            shutil.rmtree(run_dir / "student", ignore_errors=True)
    if not keep:
        shutil.rmtree(work / "cache", ignore_errors=True)
    return records


def main() -> None:
    parser = bench_arguments(__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="+", help="Hydra overrides, at least one swept (distill.alpha=0.5,0.3)")
    args = parser.parse_intermixed_args()
    found = sweep(
        args.seed, args.blocks, args.eval_blocks, args.out, args.overrides, args.student, args.store, args.keep
    )
    for record in found:
        print(json.dumps({key: record[key] for key in ("sweep_job", "overrides", "wall_s", "train_s", "heldout_ppl")}))


if __name__ == "__main__":
    main()
