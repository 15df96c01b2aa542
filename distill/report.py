"""Turn a sweep into a decision: the accuracy-vs-compression frontier of a Hydra multirun.

    python -m distill.report logs/bert_to_tiny/multiruns/<time>

Reads every job folder's ``metrics.json`` (and its ``.hydra/`` config for the swept values),
writes ``frontier.md`` (a table sorted by size, Pareto-optimal points marked, failed jobs named)
and ``frontier.png`` (accuracy against student bytes and against sparsity, one series per
temperature) into the multirun folder, and logs both to W&B when the jobs shared a W&B group.

Where a job folder holds ``serve_bench.json`` (``python -m distill.serve_bench run_dir=<job>``), its
measured serving cost joins the table and the plot: p50 latency of a batch of 32 dev sentences and
J per 1,000 requests, for the artifact a user would deploy (the int8 export if the job made one, else
the fp32 student), with the teacher's point measured on the same harness.

A folder whose serve benches are a causal LM's (a run folder, or several jobs' folders) gets the LM frontier
instead: held-out perplexity against decode tokens/s per runtime (:mod:`distill.serve.frontier_lm`).
Jobs run with ``harness.tasks`` add a table of their lm-evaluation-harness scores to ``frontier.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from distill.serve import frontier_lm

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
    served_as: str | None = None
    latency_ms: float | None = None
    joules_per_1000: float | None = None

    @property
    def retained(self) -> float | None:
        return self.val_acc / self.teacher_acc if self.teacher_acc else None

    @property
    def retained_per_kwh(self) -> float | None:
        return self.retained / self.energy_kwh if self.retained and self.energy_kwh else None


@dataclass
class TeacherPoint:
    val_acc: float
    size_bytes: float | None
    latency_ms: float
    joules_per_1000: float | None


SERVE_BATCH = 32


def serving_rows(folder: Path) -> dict[str, dict[str, Any]]:
    """``serve_bench.json``'s rows at batch 32 and the most threads it measured, by arm (empty if none)."""
    path = folder / "serve_bench.json"
    if not path.is_file():
        return {}
    rows = [row for row in json.loads(path.read_text())["rows"] if row["batch_size"] == SERVE_BATCH]
    most = max((row["threads"] for row in rows), default=None)
    return {row["arm"]: row for row in rows if row["threads"] == most}


def job_folders(multirun: Path) -> list[Path]:
    """Every job folder: one holding a ``.hydra/`` directory."""
    return sorted((path.parent.parent for path in multirun.glob("**/.hydra/config.yaml")), key=lambda p: str(p))


def read_point(folder: Path, multirun: Path) -> Point | None:
    metrics_path = folder / "metrics.json"
    if not metrics_path.is_file():
        return None
    metrics = json.loads(metrics_path.read_text())
    if metrics.get("complete") is False:  # a run stopped by a signal (distill.pipeline.interrupt): no point yet
        return None
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
        **deployed_cost(serving_rows(folder)),
    )


def deployed_cost(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    arm = next((name for name in ("student_int8", "student_fp32") if name in rows), None)
    if arm is None:
        return {}
    return {
        "served_as": arm,
        "latency_ms": rows[arm]["p50_ms"],
        "joules_per_1000": rows[arm].get("joules_per_1000_requests"),
    }


def teacher_point(folders: list[Path]) -> TeacherPoint | None:
    """The teacher as measured by the first job whose serve bench included it."""
    for folder in folders:
        row = serving_rows(folder).get("teacher_fp32")
        metrics_path = folder / "metrics.json"
        if row is None or not metrics_path.is_file():
            continue
        metrics = json.loads(metrics_path.read_text())
        if metrics.get("teacher/val_acc") is not None:
            return TeacherPoint(
                metrics["teacher/val_acc"], metrics.get("compression/teacher_size_bytes"), row["p50_ms"],
                row.get("joules_per_1000_requests"),
            )  # fmt: skip
    return None


def mark_pareto(points: list[Point]) -> None:
    """Optimal: no other point is at most as big and at least as accurate, and better in one."""
    optimal = {id(point) for point in front(points, lambda p: p.size_bytes)}
    for point in points:
        point.pareto = id(point) in optimal


def _optional(value: float | None, spec: str) -> str:
    return format(value, spec) if value is not None else "n/a"


def markdown(points: list[Point], failed: list[tuple[str, list[str]]], teacher: TeacherPoint | None = None) -> str:
    lines = [
        "| Pareto | job | swept values | T | alpha | sparsity | size (MB) | dev acc | retained | energy (Wh) "
        f"| retained / kWh | served as | p50 ms (batch {SERVE_BATCH}) | J / 1,000 requests |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if teacher is not None:
        size = _optional(teacher.size_bytes and teacher.size_bytes / 1e6, ".2f")
        lines.append(
            f"| | **teacher** | | | | | {size} | {100 * teacher.val_acc:.2f} | 100 % | | | teacher_fp32 "
            f"| {teacher.latency_ms:.2f} | {_optional(teacher.joules_per_1000, '.3g')} |"
        )
    for p in sorted(points, key=lambda p: (p.size_bytes, -p.val_acc)):
        energy = f"{1000 * p.energy_kwh:.2f}" if p.energy_kwh else "n/a"
        per_kwh = f"{p.retained_per_kwh:.0f}" if p.retained_per_kwh else "n/a"
        retained = f"{100 * p.retained:.1f} %" if p.retained else "n/a"
        lines.append(
            f"| {'★' if p.pareto else ''} | {p.job} | {' '.join(p.overrides)} | {p.temperature:g} | {p.alpha:g} "
            f"| {100 * p.sparsity:.1f} % | {p.size_bytes / 1e6:.2f} | {100 * p.val_acc:.2f} | {retained} "
            f"| {energy} | {per_kwh} | {p.served_as or 'n/a'} | {_optional(p.latency_ms, '.2f')} "
            f"| {_optional(p.joules_per_1000, '.3g')} |"
        )
    text = "\n".join(lines) + "\n\n★ Pareto-optimal: no other run is as small and as accurate.\n"
    if any(p.latency_ms for p in points) or teacher is not None:
        text += (
            f"Serving cost: `distill.serve_bench`, a batch of {SERVE_BATCH} dev sentences, the most threads measured.\n"
        )
    if failed:
        listed = "".join(f"- {job}: {' '.join(o)}\n" for job, o in failed)
        text += "\n**Failed or stopped jobs** (no complete metrics.json):\n" + listed
    return text


def front(points: list[Any], cost: Callable[[Any], float]) -> list[Any]:
    """Points no other point beats on both cost and accuracy, cheapest first."""
    optimal = [
        point
        for point in points
        if not any(
            cost(other) <= cost(point)
            and other.val_acc >= point.val_acc
            and (cost(other) < cost(point) or other.val_acc > point.val_acc)
            for other in points
        )
    ]
    return sorted(optimal, key=cost)


def plot(points: list[Point], path: Path, teacher: TeacherPoint | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    costs: list[tuple[str, Callable[[Any], float | None], str]] = [
        ("size_bytes", lambda p: p.size_bytes and p.size_bytes / 1e6, "student size (MB, as deployed)"),
        ("sparsity", lambda p: 100 * p.sparsity, "Linear-weight sparsity (%)"),
    ]
    if any(p.latency_ms for p in points):
        costs += [
            ("latency", lambda p: p.latency_ms, f"measured CPU latency, batch {SERVE_BATCH} (ms, p50)"),
            ("energy", lambda p: p.joules_per_1000, "energy per 1,000 requests (J)"),
        ]
    figure, axes = plt.subplots(1, len(costs), figsize=(5.5 * len(costs), 4.2), constrained_layout=True)
    for axis, (name, cost, label) in zip(axes, costs, strict=True):
        _draw_panel(axis, points, teacher, cost, label, with_front=name != "sparsity")
        if name in ("latency", "energy"):
            axis.set_xscale("log")
            # A log axis spanning less than a decade labels its minor ticks, which then overlap.
            axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _draw_panel(
    axis: Any,
    points: list[Point],
    teacher: TeacherPoint | None,
    cost: Callable[[Any], float | None],
    label: str,
    with_front: bool,
) -> None:
    """Accuracy against one cost: a series per temperature, and (``with_front``) the teacher and the Pareto front."""
    for index, temperature in enumerate(sorted({p.temperature for p in points})):
        series = [p for p in points if p.temperature == temperature and cost(p) is not None]
        # Hollow markers of shrinking size: series that land on the same point stay visible.
        style = dict(marker="osD^v"[index % 5], markersize=max(12 - 3 * index, 4), markerfacecolor="none", mew=2)
        xs, ys = [cost(p) for p in series], [100 * p.val_acc for p in series]
        axis.plot(xs, ys, ls="", label=f"T = {temperature:g}", **style)
        _name_points(axis, series, cost)
    comparable = [p for p in points if cost(p) is not None]
    if with_front and teacher is not None and cost(teacher) is not None:
        axis.plot([cost(teacher)], [100 * teacher.val_acc], "k*", markersize=14, label="teacher")
        comparable.append(teacher)
    if with_front and comparable:
        optimal = front(comparable, cost)
        axis.plot([cost(p) for p in optimal], [100 * p.val_acc for p in optimal], "k--", lw=1, label="Pareto front")
    axis.set(xlabel=label, ylabel="SST-2 dev accuracy (%)", title=f"Accuracy vs {label.split(' (')[0]}")
    axis.grid(alpha=0.3)
    axis.legend()


def _name_points(axis: Any, series: list[Point], cost: Callable[[Any], float | None]) -> None:
    """Each point labelled with its job, so a reader can tell which run to deploy."""
    for point in series:
        axis.annotate(
            point.job, (cost(point), 100 * point.val_acc), xytext=(4, 4), textcoords="offset points", fontsize=7
        )


def wandb_group(folders: list[Path]) -> tuple[str, str] | None:
    for folder in folders:
        cfg = OmegaConf.load(folder / ".hydra" / "config.yaml")
        wandb_cfg = OmegaConf.select(cfg, "logger.wandb")
        if wandb_cfg is not None and wandb_cfg.get("group"):
            return wandb_cfg.project, wandb_cfg.group
    return None


def log_to_wandb(group: tuple[str, str], points: list[Point], png: Path) -> None:
    import wandb

    fields = ["job", "temperature", "alpha", "sparsity", "size_bytes", "val_acc", "retained", "energy_kwh", "pareto"]
    fields += ["served_as", "latency_ms", "joules_per_1000"]
    rows = [[getattr(p, name) for name in fields] for p in points]
    columns = [
        {"latency_ms": "latency_ms_b32", "joules_per_1000": "joules_per_1000_requests"}.get(f, f) for f in fields
    ]
    run = wandb.init(project=group[0], group=group[1], job_type="report", name=f"{group[1]}-frontier")
    run.log({"frontier/table": wandb.Table(columns=columns, data=rows), "frontier/plot": wandb.Image(str(png))})
    run.finish()


def report(multirun: Path) -> dict[str, Any]:
    """frontier.md (and .png) of a sweep or a causal LM's serve benches, with the harness scores where jobs have any."""
    # Causal LMs with serve benches: perplexity against decode speed; otherwise the sweep's accuracy frontier.
    summary = frontier_lm.report(multirun) if frontier_lm.bench_files(multirun) else frontier(multirun)
    scores = harness_table(job_folders(multirun), multirun)
    if scores:
        with (multirun / "frontier.md").open("a") as frontier_md:
            frontier_md.write(scores)
    return summary


def harness_table(folders: list[Path], multirun: Path) -> str:
    """A table of the lm-evaluation-harness scores (``harness/<model>/<task>/<metric>``) of the jobs that have
    them (``harness.tasks``, distill.pipeline.harness): one row per job, one column per score; "" if none."""
    rows = {}
    for folder in folders:
        path = folder / "metrics.json"
        metrics = json.loads(path.read_text()) if path.is_file() else {}
        scores = {key.removeprefix("harness/"): value for key, value in metrics.items() if key.startswith("harness/")}
        if scores:
            rows[str(folder.relative_to(multirun))] = scores
    columns = sorted({column for scores in rows.values() for column in scores})
    if not columns:
        return ""
    lines = ["| job | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for job, scores in rows.items():
        lines.append(f"| {job} | " + " | ".join(_optional(scores.get(column), ".4g") for column in columns) + " |")
    return "\n## Standard evaluation (lm-evaluation-harness, model/task/metric)\n\n" + "\n".join(lines) + "\n"


def frontier(multirun: Path) -> dict[str, Any]:
    """The accuracy-vs-compression frontier of a sweep's job folders."""
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
    teacher = teacher_point(folders)
    (multirun / "frontier.md").write_text(f"# Frontier of {multirun}\n\n" + markdown(points, failed, teacher))
    if points:
        plot(points, multirun / "frontier.png", teacher)
    group = wandb_group(folders)
    if group and points:
        log_to_wandb(group, points, multirun / "frontier.png")
    for job, overrides in failed:
        log.warning("job %s (%s) has no complete metrics.json: it failed, was stopped or is still running", job,
                    " ".join(overrides))  # fmt: skip
    return {"points": len(points), "failed": [job for job, _ in failed]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Accuracy-vs-compression frontier of a Hydra multirun folder (causal LMs: the LM frontier)"
    )
    parser.add_argument("multirun", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        summary = report(args.multirun)
    except FileNotFoundError as error:
        parser.error(str(error))
    points = f"{summary['points']} {summary.get('unit', 'runs')}"
    print(f"{points} -> {args.multirun / 'frontier.md'}, {args.multirun / 'frontier.png'}")
    if summary["failed"]:
        print(f"failed: {', '.join(summary['failed'])}")


if __name__ == "__main__":
    main()
