"""The peer bench's figures from its records: each seed's arms side by side with their ratios to TRL, and a
sweep's total against TRL running the same number of runs.

    python -m bench.peers.summary bench/results/peers [--sweep RECORD ...]

The folder holds the records (``<arm>-seed<seed>.json``). ``--sweep`` names the distill records of a sweep
whose runs share one store (``bench.peers.run --store``); the first run built it, and its ``wall_s`` counts
the build. TRL has no store, alpha or temperature, so each of its runs costs what a run at that
seed cost, and the sweep's TRL total is the sum of the TRL records of the sweep's seeds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

COLUMNS = (
    ("wall_s", "wall s"),
    ("train_s", "train s"),
    ("train_tokens_per_s", "train tokens/s"),
    ("peak_rss_mb", "peak RSS MB"),
    ("heldout_ppl", "held-out ppl"),
)


def records(folder: Path) -> list[dict[str, Any]]:
    found = [json.loads(path.read_text()) for path in sorted(folder.glob("*-seed*.json"))]
    if not found:
        raise SystemExit(f"no <arm>-seed<seed>.json records in {folder}")
    return found


def ratio(value: float, baseline: float | None) -> str:
    return f" ({value / baseline:.2f}x)" if baseline else ""


def seed_table(found: list[dict[str, Any]]) -> list[str]:
    """One row per arm and seed; every figure but perplexity followed by its ratio to TRL's at that seed."""
    trl = {record["seed"]: record for record in found if record["arm"] == "trl"}
    lines = ["| seed | arm | " + " | ".join(title for _, title in COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for record in sorted(found, key=lambda record: (record["seed"], record["arm"])):
        baseline = trl.get(record["seed"], {})
        cells = [
            f"{record[key]:,.1f}" + ("" if key == "heldout_ppl" else ratio(record[key], baseline.get(key)))
            for key, _ in COLUMNS
        ]
        lines.append(f"| {record['seed']} | {record['arm']} | " + " | ".join(cells) + " |")
    return lines


def sweep_line(sweep: list[dict[str, Any]], found: list[dict[str, Any]]) -> str:
    trl = {record["seed"]: record["wall_s"] for record in found if record["arm"] == "trl"}
    missing = sorted({run["seed"] for run in sweep} - trl.keys())
    if missing:
        raise SystemExit(f"no TRL record for seed(s) {missing}: the sweep's TRL total needs one per seed")
    distill, baseline = sum(run["wall_s"] for run in sweep), sum(trl[run["seed"]] for run in sweep)
    points = ", ".join(f"seed {run['seed']} {' '.join(run['overrides']) or 'defaults'}" for run in sweep)
    return (
        f"sweep of {len(sweep)} ({points}): distill {distill:,.1f} s, TRL {baseline:,.1f} s ({distill / baseline:.2f}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--sweep", type=Path, nargs="*", default=[], help="the distill records of a shared-store sweep")
    args = parser.parse_args()
    found = records(args.folder)
    print("\n".join(seed_table(found)))
    if args.sweep:
        print(sweep_line([json.loads(path.read_text()) for path in args.sweep], found))


if __name__ == "__main__":
    main()
