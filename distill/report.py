"""Turn a sweep into a decision: the accuracy-vs-compression frontier of a Hydra multirun.

    python -m distill.report logs/bert_to_tiny/multiruns/<time>

Reads every job folder's ``metrics.json`` (and its ``.hydra/`` config for the swept values),
writes ``frontier.md`` (a table sorted by size, Pareto-optimal points marked, failed jobs named)
and ``frontier.png`` (accuracy against student bytes and against sparsity, one series per
temperature) into the multirun folder, and logs both to W&B when the jobs shared a W&B group.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

log = logging.getLogger("distill.report")


@dataclass
class Point:
    job: str
    overrides: list[str]
    temperature: float
    alpha: float
    val_acc: float
    teacher_acc: float | None
    size_bytes: float
    sparsity: float
    energy_kwh: float | None
    wall_time_s: float | None
    pareto: bool = field(default=False)

    @property
    def retained(self) -> float | None:
        return self.val_acc / self.teacher_acc if self.teacher_acc else None

    @property
    def retained_per_kwh(self) -> float | None:
        return self.retained / self.energy_kwh if self.retained and self.energy_kwh else None


def job_folders(multirun: Path) -> list[Path]:
    """Every job folder: one holding a ``.hydra/`` directory."""
    return sorted((path.parent.parent for path in multirun.glob("**/.hydra/config.yaml")), key=lambda p: str(p))


def read_point(folder: Path, multirun: Path) -> Point | None:
    metrics_path = folder / "metrics.json"
    if not metrics_path.is_file():
        return None
    metrics = json.loads(metrics_path.read_text())
    cfg = OmegaConf.load(folder / ".hydra" / "config.yaml")
    overrides = list(OmegaConf.load(folder / ".hydra" / "overrides.yaml"))
    return Point(
        job=str(folder.relative_to(multirun)),
        overrides=overrides,
        temperature=cfg.distill.temperature,
        alpha=cfg.distill.alpha,
        val_acc=metrics["student/val_acc"],
        teacher_acc=metrics.get("teacher/val_acc"),
        size_bytes=metrics.get("compression/size_bytes", 4 * metrics["student/params"]),
        sparsity=metrics.get("compression/linear_sparsity", 0.0),
        energy_kwh=metrics.get("energy/kwh"),
        wall_time_s=metrics.get("wall_time_s"),
    )


def mark_pareto(points: list[Point]) -> None:
    """Optimal: no other point is at most as big and at least as accurate, and better in one."""
    for point in points:
        point.pareto = not any(
            other.size_bytes <= point.size_bytes
            and other.val_acc >= point.val_acc
            and (other.size_bytes < point.size_bytes or other.val_acc > point.val_acc)
            for other in points
        )


def markdown(points: list[Point], failed: list[tuple[str, list[str]]]) -> str:
    lines = [
        "| Pareto | job | swept values | T | alpha | sparsity | size (MB) | dev acc | retained | energy (Wh) "
        "| retained / kWh |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in sorted(points, key=lambda p: (p.size_bytes, -p.val_acc)):
        energy = f"{1000 * p.energy_kwh:.2f}" if p.energy_kwh else "n/a"
        per_kwh = f"{p.retained_per_kwh:.0f}" if p.retained_per_kwh else "n/a"
        retained = f"{100 * p.retained:.1f} %" if p.retained else "n/a"
        lines.append(
            f"| {'★' if p.pareto else ''} | {p.job} | {' '.join(p.overrides)} | {p.temperature:g} | {p.alpha:g} "
            f"| {100 * p.sparsity:.1f} % | {p.size_bytes / 1e6:.2f} | {100 * p.val_acc:.2f} | {retained} "
            f"| {energy} | {per_kwh} |"
        )
    text = "\n".join(lines) + "\n\n★ Pareto-optimal: no other run is as small and as accurate.\n"
    if failed:
        text += "\n**Failed jobs** (no metrics.json):\n" + "".join(f"- {job}: {' '.join(o)}\n" for job, o in failed)
    return text


def plot(points: list[Point], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_size, by_sparsity) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for index, temperature in enumerate(sorted({p.temperature for p in points})):
        series = sorted((p for p in points if p.temperature == temperature), key=lambda p: p.size_bytes)
        # Hollow markers of shrinking size: series that land on the same point stay visible.
        style = dict(marker="osD^v"[index % 5], markersize=max(12 - 3 * index, 4), markerfacecolor="none", mew=2)
        label = f"T = {temperature:g}"
        by_size.plot([p.size_bytes / 1e6 for p in series], [100 * p.val_acc for p in series], "-", label=label, **style)
        by_sparsity.plot(
            [100 * p.sparsity for p in series], [100 * p.val_acc for p in series], ls="", label=label, **style
        )
    front = sorted((p for p in points if p.pareto), key=lambda p: p.size_bytes)
    by_size.plot(
        [p.size_bytes / 1e6 for p in front], [100 * p.val_acc for p in front], "k--", lw=1, label="Pareto front"
    )
    by_size.set(xlabel="student size (MB, as deployed)", ylabel="SST-2 dev accuracy (%)", title="Accuracy vs size")
    by_sparsity.set(xlabel="Linear-weight sparsity (%)", ylabel="SST-2 dev accuracy (%)", title="Accuracy vs sparsity")
    for axis in (by_size, by_sparsity):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def wandb_group(folders: list[Path]) -> tuple[str, str] | None:
    for folder in folders:
        cfg = OmegaConf.load(folder / ".hydra" / "config.yaml")
        wandb_cfg = OmegaConf.select(cfg, "logger.wandb")
        if wandb_cfg is not None and wandb_cfg.get("group"):
            return wandb_cfg.project, wandb_cfg.group
    return None


def log_to_wandb(group: tuple[str, str], points: list[Point], png: Path) -> None:
    import wandb

    columns = ["job", "temperature", "alpha", "sparsity", "size_bytes", "val_acc", "retained", "energy_kwh", "pareto"]
    rows = [
        [p.job, p.temperature, p.alpha, p.sparsity, p.size_bytes, p.val_acc, p.retained, p.energy_kwh, p.pareto]
        for p in points
    ]
    run = wandb.init(project=group[0], group=group[1], job_type="report", name=f"{group[1]}-frontier")
    run.log({"frontier/table": wandb.Table(columns=columns, data=rows), "frontier/plot": wandb.Image(str(png))})
    run.finish()


def report(multirun: Path) -> dict[str, Any]:
    folders = job_folders(multirun)
    if not folders:
        raise FileNotFoundError(f"no Hydra job folders (with .hydra/config.yaml) under {multirun}")
    points, failed = [], []
    for folder in folders:
        point = read_point(folder, multirun)
        if point is None:
            failed.append(
                (str(folder.relative_to(multirun)), list(OmegaConf.load(folder / ".hydra" / "overrides.yaml")))
            )
        else:
            points.append(point)
    mark_pareto(points)
    every_job = [set(p.overrides) for p in points] + [set(overrides) for _, overrides in failed]
    shared = set.intersection(*every_job) if len(every_job) > 1 else set()
    for point in points:  # the table shows what the sweep varied, not what every job shared
        point.overrides = [o for o in point.overrides if o not in shared]
    failed = [(job, [o for o in overrides if o not in shared]) for job, overrides in failed]
    (multirun / "frontier.md").write_text(f"# Frontier of {multirun}\n\n" + markdown(points, failed))
    if points:
        plot(points, multirun / "frontier.png")
    group = wandb_group(folders)
    if group and points:
        log_to_wandb(group, points, multirun / "frontier.png")
    for job, overrides in failed:
        log.warning("job %s (%s) has no metrics.json: it failed or is still running", job, " ".join(overrides))
    return {"points": len(points), "failed": [job for job, _ in failed]}


def main() -> None:
    parser = argparse.ArgumentParser(description="Accuracy-vs-compression frontier of a Hydra multirun folder")
    parser.add_argument("multirun", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        summary = report(args.multirun)
    except FileNotFoundError as error:
        parser.error(str(error))
    print(f"{summary['points']} runs -> {args.multirun / 'frontier.md'}, {args.multirun / 'frontier.png'}")
    if summary["failed"]:
        print(f"failed: {', '.join(summary['failed'])}")


if __name__ == "__main__":
    main()
