"""distill.report: Pareto marks, swept values, failed jobs, the plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distill.report import report


def fake_job(root: Path, job: str, temperature: float, sparsity: float | None, acc: float | None, size: float) -> None:
    folder = root / job
    (folder / ".hydra").mkdir(parents=True)
    config = {"distill": {"temperature": temperature, "alpha": 0.5}, "logger": {"csv": {}}}
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    overrides = [f"distill.temperature={temperature}", "seed=1", f"compression={'gmp80' if sparsity else 'none'}"]
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if acc is not None:
        metrics = {
            "student/val_acc": acc,
            "teacher/val_acc": 0.9,
            "student/params": 1000,
            "compression/size_bytes": size,
            "compression/linear_sparsity": sparsity or 0.0,
            "energy/kwh": 0.01,
            "wall_time_s": 60,
        }
        (folder / "metrics.json").write_text(json.dumps(metrics))


def test_frontier_table_marks_pareto_points_and_names_failures(tmp_path: Path) -> None:
    fake_job(tmp_path, "0", 1.0, None, 0.85, 4e6)
    fake_job(tmp_path, "1", 1.0, 0.8, 0.84, 1e6)
    fake_job(tmp_path, "2", 4.0, None, 0.83, 4e6)  # dominated by job 0
    fake_job(tmp_path, "3", 4.0, 0.8, None, 1e6)  # failed
    summary = report(tmp_path)
    assert summary == {"points": 3, "failed": ["3"]}
    rows = [line for line in (tmp_path / "frontier.md").read_text().splitlines() if line.startswith("| ")][1:]
    rows = [row for row in rows if not row.startswith("|---")]
    assert [row.split("|")[2].strip() for row in rows] == ["1", "0", "2"]  # sorted by size
    assert [row.split("|")[1].strip() for row in rows] == ["★", "★", ""]
    assert "seed=1" not in rows[0] and "compression=gmp80" in rows[0]  # only what the sweep varied
    assert rows[0].endswith("| 93.3 % | 10.00 | 93 | n/a | n/a | n/a |")  # retained, Wh, per kWh; not served
    assert (
        "**Failed or stopped jobs**" in (tmp_path / "frontier.md").read_text()
        and "- 3: " in (tmp_path / "frontier.md").read_text()
    )
    assert (tmp_path / "frontier.png").stat().st_size > 10_000


def test_a_job_stopped_by_a_signal_is_listed_as_failed_not_plotted(tmp_path: Path) -> None:
    fake_job(tmp_path, "0", 1.0, None, 0.85, 4e6)
    fake_job(tmp_path, "1", 1.0, 0.8, None, 1e6)
    stopped = {"complete": False, "reason": "SIGTERM during fit at step 7", "global_step": 7, "student/params": 1000}
    (tmp_path / "1" / "metrics.json").write_text(json.dumps(stopped))
    assert report(tmp_path) == {"points": 1, "failed": ["1"]}


def test_an_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "distill.report", str(tmp_path)], capture_output=True, text=True)
    assert (
        result.returncode == 2 and f"no Hydra job folders (with .hydra/config.yaml) under {tmp_path}" in result.stderr
    )


@pytest.mark.slow
def test_a_shared_wandb_group_gets_the_table_and_plot(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    (tmp_path / "wandb-dir").mkdir()
    sweep = tmp_path / "sweep"
    for job, sparsity in (("0", None), ("1", 0.8)):
        fake_job(sweep, job, 2.0, sparsity, 0.84, 4e6 if sparsity is None else 1e6)
        config = yaml.safe_load((sweep / job / ".hydra" / "config.yaml").read_text())
        config["logger"] = {"wandb": {"project": "distill-test", "group": "sweep-a"}}
        (sweep / job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    report(sweep)
    runs = list((tmp_path / "wandb-dir" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def serve_rows(job: Path, int8: float | None, fp32: float, teacher: float) -> None:
    rows = [
        {"arm": arm, "threads": threads, "batch_size": 32, "p50_ms": ms * (3 - threads), "joules_per_1000_requests": ms}
        for arm, ms in (("student_int8", int8), ("student_fp32", fp32), ("teacher_fp32", teacher))
        if ms is not None
        for threads in (1, 2)
    ]
    (job / "serve_bench.json").write_text(json.dumps({"rows": rows, "skipped": {}, "energy_source": "estimate"}))


def test_measured_serving_cost_joins_the_table_and_the_plot(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    fake_job(tmp_path, "0", 1.0, None, 0.85, 4e6)
    fake_job(tmp_path, "1", 1.0, 0.8, 0.84, 1e6)
    serve_rows(tmp_path / "0", int8=None, fp32=40.0, teacher=120.0)
    serve_rows(tmp_path / "1", int8=10.0, fp32=40.0, teacher=120.0)
    report(tmp_path)
    text = (tmp_path / "frontier.md").read_text()
    rows = {row.split("|")[2].strip(): row for row in text.splitlines() if row.startswith("| ")}
    assert rows["1"].endswith("| student_int8 | 10.00 | 10 |")  # int8 deployed; 2 threads, batch 32
    assert rows["0"].endswith("| student_fp32 | 40.00 | 40 |")
    assert "| **teacher** |" in text and "| 90.00 | 100 % |" in text and "| teacher_fp32 | 120.00 | 120 |" in text
    two_panels = plt.imread(tmp_path / "frontier.png").shape[1]
    fake_job(tmp_path / "bare", "0", 1.0, None, 0.85, 4e6)
    report(tmp_path / "bare")
    assert two_panels > plt.imread(tmp_path / "bare" / "frontier.png").shape[1] * 1.8  # latency and energy panels


def test_every_point_of_the_plot_is_named_by_its_job(tmp_path: Path, monkeypatch) -> None:
    import matplotlib.figure

    for job, acc in (("dense", 0.85), ("sparse", 0.84)):
        fake_job(tmp_path, job, 1.0, 0.8 if job == "sparse" else None, acc, 4e6)
    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda figure, *args, **kwargs: saved.append(figure))
    report(tmp_path)
    for axis in saved[0].axes:  # size and sparsity
        assert sorted(text.get_text() for text in axis.texts) == ["dense", "sparse"]


def test_harness_scores_get_their_own_table(tmp_path: Path) -> None:
    fake_job(tmp_path, "0", 1.0, None, 0.85, 4e6)
    fake_job(tmp_path, "1", 1.0, 0.8, 0.84, 1e6)
    metrics = json.loads((tmp_path / "1" / "metrics.json").read_text())
    scores = {"harness/student/sonnets/bits_per_byte": 1.23456, "harness/teacher/sonnets/bits_per_byte": 1.0}
    (tmp_path / "1" / "metrics.json").write_text(json.dumps(metrics | scores))
    report(tmp_path)
    table = (tmp_path / "frontier.md").read_text().split("## Standard evaluation (lm-evaluation-harness")[1]
    assert "| job | student/sonnets/bits_per_byte | teacher/sonnets/bits_per_byte |" in table
    assert "| 1 | 1.235 | 1 |" in table and "| 0 |" not in table  # only the jobs that ran it


def test_no_harness_table_without_harness_scores(tmp_path: Path) -> None:
    fake_job(tmp_path, "0", 1.0, None, 0.85, 4e6)
    report(tmp_path)
    assert "lm-evaluation-harness" not in (tmp_path / "frontier.md").read_text()
