"""The LM frontier: held-out perplexity against decode tokens/s (and J per 1,000 tokens) of every artifact that
causal-LM serve benches measured, with the teacher's own GGUF file in llama.cpp as the reference point.

    python -m distill.report <folder>

``<folder>`` holds one ``serve_bench.json`` of a causal LM (``python -m distill.serve_bench``) or several job
folders that do (e.g. the short and the long student's runs): they combine into one frontier, each point named
``<job>/<arm>``. ``frontier.md`` and ``frontier.png`` are written into ``<folder>`` from those files and each
job's ``git.json`` alone, so a committed frontier regenerates with no model present. An artifact measured in
several jobs (the same file: its sha256; the teacher) is kept once, from the first job, and the table says so.
A point's speed ratio is to the reference measured in its own job, interleaved with it, where the job has one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = "serve_bench.json"
MARKERS = {"llama.cpp": "o", "onnxruntime": "s", "pytorch": "^"}


@dataclass
class LMPoint:
    job: str
    arm: str
    runtime: str
    size_bytes: int | None
    perplexity: float | None
    decode: dict[int, float]  # threads -> decode tokens/s at batch 1
    first_token_ms: float | None  # at the most threads, as the energy
    joules_per_1000: float | None
    aggregate: dict[int, float]  # parallel requests -> aggregate tokens/s, at the most threads
    identity: tuple[str, str]
    reference: bool = False
    job_reference: LMPoint | None = None
    pareto: bool = False

    @property
    def label(self) -> str:
        return f"{self.job}/{self.arm}"

    def ratio(self, threads: int) -> float | None:
        ours, theirs = self.decode.get(threads), self.job_reference and self.job_reference.decode.get(threads)
        return ours / theirs if ours and theirs else None


def is_lm_bench(path: Path) -> bool:
    return any("decode_tokens_per_s" in row for row in json.loads(path.read_text()).get("rows", []))


def bench_files(folder: Path) -> list[Path]:
    """The causal-LM serve benches in ``folder`` and below, in path order (the first job is ``folder``'s own)."""
    return [path for path in sorted(folder.rglob(RESULTS)) if is_lm_bench(path)]


def job_points(path: Path, job: str) -> list[LMPoint]:
    """One point per artifact (arm) of one serve bench; its parallel rows join their arm's point."""
    results = json.loads(path.read_text())
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for row in results["rows"]:
        by_arm.setdefault(row["arm"].split("/parallel")[0], []).append(row)
    points = [point_of(job, arm, rows) for arm, rows in by_arm.items()]
    reference = next((p for p in points if p.arm == results.get("reference_arm")), None)
    for point in points:
        point.reference, point.job_reference = point is reference, reference
    return points


def point_of(job: str, arm: str, rows: list[dict[str, Any]]) -> LMPoint:
    single = [row for row in rows if row.get("parallel", 1) == 1]
    most = max(row["threads"] for row in single)
    top = next(row for row in single if row["threads"] == most)
    artifact = top.get("artifact_sha256") or top.get("artifact") or f"{job}/{arm}"  # else the arm is its own artifact
    return LMPoint(
        job, arm, top.get("runtime", "pytorch"), top.get("artifact_bytes"), top.get("perplexity"),
        {row["threads"]: row["decode_tokens_per_s"] for row in single}, top.get("time_to_first_token_ms"),
        top.get("joules_per_1000_tokens"),
        {row["parallel"]: row["aggregate_tokens_per_s"] for row in rows if row.get("parallel", 1) > 1
         and row["threads"] == most},
        (top.get("runtime", "pytorch"), artifact),
    )  # fmt: skip


def read_points(folder: Path) -> tuple[list[LMPoint], list[str], list[Path]]:
    """Every job's points, an artifact measured again in a later job dropped (with a note), and the files read."""
    files, points, notes, seen = bench_files(folder), [], [], {}
    for path in files:
        job = folder.name if path.parent == folder else str(path.parent.relative_to(folder))
        for point in job_points(path, job):
            first = seen.setdefault(point.identity, point)
            if first is point:
                points.append(point)
            else:
                notes.append(f"`{point.label}` is the artifact of `{first.label}`, measured again: the first is kept")
    return points, notes, files


def most_threads(points: list[LMPoint]) -> int:
    return max(threads for point in points for threads in point.decode)


def mark_pareto(points: list[LMPoint]) -> None:
    """Optimal: no other point has at most its perplexity and at least its decode tokens/s at the most threads,
    and is better in one. Points without both figures are off the front."""
    threads = most_threads(points)
    ranked = [p for p in points if p.perplexity is not None and p.decode.get(threads) is not None]
    for point in points:
        point.pareto = point in ranked and not any(
            other.perplexity <= point.perplexity
            and other.decode[threads] >= point.decode[threads]
            and (other.perplexity < point.perplexity or other.decode[threads] > point.decode[threads])
            for other in ranked
        )


def _number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(points: list[LMPoint]) -> list[str]:
    threads = sorted({t for point in points for t in point.decode})
    parallel = sorted({p for point in points for p in point.aggregate})
    head = ["Pareto", "point", "runtime", "MB", "perplexity"]
    head += [f"decode tok/s, {t} thr (x ref)" for t in threads]
    most = most_threads(points)
    head += [f"first token ms, {most} thr", f"J / 1,000 tokens, {most} thr"]
    head += [f"{p} parallel: tok/s, {most} thr" for p in parallel]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for p in sorted(points, key=lambda p: (p.perplexity is None, p.perplexity or 0, p.label)):
        name = f"**{p.label}** (reference)" if p.reference else p.label
        cells = ["★" if p.pareto else "", name, p.runtime, _number(p.size_bytes and p.size_bytes / 1e6, ".1f")]
        cells.append(_number(p.perplexity, ".2f"))
        cells += [f"{_number(p.decode.get(t), '.1f')} ({_number(p.ratio(t), '.2f')}x)" for t in threads]
        cells += [_number(p.first_token_ms, ".1f"), _number(p.joules_per_1000, ".3g")]
        cells += [_number(p.aggregate.get(n), ".1f") for n in parallel]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def jobs_section(files: list[Path], folder: Path) -> list[str]:
    """Per job: the commit measured (the bench's, else the run's ``git.json``), the CPU and how energy was read."""
    lines = [
        "",
        "| job | commit | CPU flags | energy | reference arm | perplexity blocks |",
        "|---|---|---|---|---|---|",
    ]
    for path in files:
        results, git = json.loads(path.read_text()), path.parent / "git.json"
        state = results.get("git") or (json.loads(git.read_text()) if git.is_file() else {})
        commit = (state.get("commit") or "n/a")[:10] + (" (dirty)" if state.get("dirty") else "")
        job = folder.name if path.parent == folder else str(path.parent.relative_to(folder))
        flags = " ".join(results.get("cpu_flags") or []) or "n/a"
        lines.append(
            f"| {job} | {commit} | {flags} | {results.get('energy_source')} | {results.get('reference_arm')} "
            f"| {results.get('perplexity_blocks', 'n/a')} |"
        )
    return lines


def markdown(points: list[LMPoint], notes: list[str], files: list[Path], folder: Path) -> str:
    threads = most_threads(points)
    text = [f"# LM frontier of {folder.name}", "", *table(points), ""]
    text.append(
        f"★ Pareto-optimal: no other point has as low a held-out perplexity and as high a decode tokens/s at "
        f"{threads} thread(s), and better one of them. Perplexity: each artifact through its own runtime on the "
        "same first test blocks. x ref: decode tokens/s over the reference's (the teacher's own GGUF file in "
        "llama.cpp) measured in the same job. Batch 1, greedy; parallel: that many requests at once to llama.cpp's "
        "server, tokens over wall time."
    )
    text += [f"- {note}" for note in notes]
    return "\n".join([*text, *jobs_section(files, folder)]) + "\n"


def plot(points: list[LMPoint], path: Path) -> None:
    """Perplexity against decode tokens/s at the most threads (with the Pareto front) and against J per 1,000
    tokens: one marker per runtime, the reference starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = most_threads(points)
    panels = [(lambda p: p.decode.get(threads), f"decode tokens/s (batch 1, {threads} thread(s))", True)]
    if any(p.joules_per_1000 for p in points):
        energy = f"J per 1,000 tokens (batch 1, {threads} thread(s))"
        panels.append((lambda p: p.joules_per_1000 or None, energy, False))
    figure, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), constrained_layout=True, squeeze=False)
    for axis, (cost, label, with_front) in zip(axes[0], panels, strict=True):
        _panel(axis, [p for p in points if cost(p) is not None and p.perplexity is not None], cost, label, with_front)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _panel(axis: Any, points: list[LMPoint], cost: Any, label: str, with_front: bool) -> None:
    from matplotlib.ticker import FormatStrFormatter

    for runtime in sorted({p.runtime for p in points}):
        series = [p for p in points if p.runtime == runtime]
        axis.plot([cost(p) for p in series], [p.perplexity for p in series], ls="", marker=MARKERS.get(runtime, "D"),
                  markersize=9, markerfacecolor="none", mew=2, label=runtime)  # fmt: skip
    for point in points:
        axis.annotate(
            point.label, (cost(point), point.perplexity), xytext=(4, 4), textcoords="offset points", fontsize=7
        )
    for point in (p for p in points if p.reference):
        axis.plot([cost(point)], [point.perplexity], "k*", markersize=16, label="teacher GGUF, llama.cpp (reference)")
    front = sorted((p for p in points if p.pareto), key=cost)
    if with_front and front:
        axis.plot([cost(p) for p in front], [p.perplexity for p in front], "k--", lw=1, label="Pareto front")
    axis.set_yscale("log")
    # plain numbers: a log axis spanning less than a decade would label its ticks 2x10^1, 3x10^1
    axis.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    axis.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    axis.set(xlabel=label, ylabel="held-out perplexity (log scale)", title=f"Perplexity vs {label.split(' (')[0]}")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)


def report(folder: Path) -> dict[str, Any]:
    """``frontier.md`` and ``frontier.png`` of the causal-LM serve benches in ``folder``."""
    points, notes, files = read_points(folder)
    if not points:
        raise FileNotFoundError(f"no causal-LM {RESULTS} (rows with decode_tokens_per_s) under {folder}")
    mark_pareto(points)
    (folder / "frontier.md").write_text(markdown(points, notes, files, folder))
    plot(points, folder / "frontier.png")
    return {"points": len(points), "unit": "artifacts", "failed": [], "duplicates": notes}
