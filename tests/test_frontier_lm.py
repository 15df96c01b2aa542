"""The LM frontier from serve-bench files alone (no model): Pareto marks, speed against the teacher's GGUF in
llama.cpp, several jobs in one frontier and the teacher measured twice kept once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill.report import report
from distill.serve.frontier_lm import read_points

TEACHER_SHA = "a" * 64


def row(arm: str, runtime: str, threads: int, decode: float, ppl: float, size: int, **more) -> dict:
    return {
        "arm": arm, "runtime": runtime, "threads": threads, "batch_size": 1, "parallel": 1, "prompt_tokens": 30,
        "artifact": f"/models/{arm}", "artifact_bytes": size, "artifact_sha256": None, "perplexity": ppl,
        "time_to_first_token_ms": 100.0 / threads, "prefill_tokens_per_s": 300.0, "decode_tokens_per_s": decode,
        "aggregate_tokens_per_s": decode * 0.9, "generate_p90_ms": 500.0, "joules_per_1000_tokens": 1000 / decode,
        "llamacpp_decode_tokens_per_s": decode if runtime == "llama.cpp" else None,
        "llamacpp_prefill_tokens_per_s": None, **more,
    }  # fmt: skip


def teacher(threads: int, decode: float) -> dict:
    return row("teacher_gguf_q4_1", "llama.cpp", threads, decode, 20.0, 98_000_000, artifact_sha256=TEACHER_SHA)


def write_job(folder: Path, rows: list[dict], commit: str = "0123456789abcdef") -> Path:
    folder.mkdir(parents=True)
    results = {
        "rows": rows, "skipped": {}, "energy_source": "estimate", "cpu": 2, "cpu_flags": ["avx2"],
        "reference_arm": "teacher_gguf_q4_1", "perplexity_blocks": 16, "prompt_tokens": 32, "new_tokens": 32,
    }  # fmt: skip
    (folder / "serve_bench.json").write_text(json.dumps(results))
    (folder / "git.json").write_text(json.dumps({"commit": commit, "dirty": False}))
    return folder


@pytest.fixture
def two_jobs(tmp_path: Path) -> Path:
    """The short and the long student's benches, the teacher's GGUF measured in both."""
    short = [teacher(1, 80.0), teacher(2, 120.0)]
    short += [row("student_gguf_q4_1", "llama.cpp", t, 120.0 * t, 30.0, 65_000_000) for t in (1, 2)]
    short += [row("student_int8", "onnxruntime", t, 70.0 * t, 40.0, 150_000_000) for t in (1, 2)]  # dominated
    parallel = row("student_gguf_q4_1/parallel4", "llama.cpp", 2, 1.0, 30.0, 65_000_000, parallel=4)
    short.append(parallel | {"decode_tokens_per_s": None, "aggregate_tokens_per_s": 400.0})
    long = [teacher(1, 60.0), teacher(2, 100.0)]
    long += [row("student_gguf_f16", "llama.cpp", t, 50.0 * t, 18.0, 250_000_000) for t in (1, 2)]
    write_job(tmp_path / "frontier-lm" / "short", short)
    write_job(tmp_path / "frontier-lm" / "long", long, commit="fedcba9876543210")
    return tmp_path / "frontier-lm"


def test_lm_frontier_marks_pareto_points_and_ratios_to_the_teacher_in_llamacpp(two_jobs: Path) -> None:
    summary = report(two_jobs)
    text = (two_jobs / "frontier.md").read_text()
    assert (two_jobs / "frontier.png").stat().st_size > 0 and summary["points"] == 4
    lines = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| ") and " | " in line}
    # the q4_1 student decodes 1.5x the teacher at 1 thread and 2x at 2; ONNX Runtime's int8 is beaten on both axes
    student = lines["short/student_gguf_q4_1"]
    assert student.startswith("| ★ ") and "120.0 (1.50x)" in student and "240.0 (2.00x)" in student
    assert "400.0" in student  # its 4 parallel requests, at the most threads
    assert lines["short/student_int8"].startswith("|  |") and "onnxruntime" in lines["short/student_int8"]
    # the long job's f16 student: lower perplexity, so on the front though slower; its ratio is to its own job's
    # teacher, measured interleaved with it (the short job's teacher is the same file, so not a point of its own)
    f16 = lines["long/student_gguf_f16"]
    assert f16.startswith("| ★ ") and "50.0 (0.83x)" in f16 and "100.0 (1.00x)" in f16
    reference = lines["**long/teacher_gguf_q4_1** (reference)"]
    assert reference.startswith("|  |") and "60.0 (1.00x)" in reference and "| 98.0 |" in reference
    assert "0123456789" in text and "fedcba9876" in text and "avx2" in text


def test_the_teacher_measured_in_two_jobs_is_one_point_the_first(two_jobs: Path) -> None:
    points, notes, files = read_points(two_jobs)
    teachers = [point for point in points if point.arm == "teacher_gguf_q4_1"]
    assert [point.job for point in teachers] == ["long"] and len(files) == 2  # "long" sorts first
    assert notes == [
        "`short/teacher_gguf_q4_1` is the artifact of `long/teacher_gguf_q4_1`, measured again: the first is kept"
    ]
    report(two_jobs)
    assert notes[0] in (two_jobs / "frontier.md").read_text()


def test_one_run_folder_is_a_frontier_of_its_own_artifacts(tmp_path: Path) -> None:
    run = write_job(tmp_path / "run", [teacher(1, 80.0), row("teacher_fp32", "pytorch", 1, 15.0, 20.0, 540_000_000)])
    results = json.loads((run / "serve_bench.json").read_text())
    (run / "serve_bench.json").write_text(json.dumps(results | {"git": {"commit": "99887766554433", "dirty": True}}))
    assert report(run)["points"] == 2  # the same teacher, two runtimes: two points
    text = (run / "frontier.md").read_text()
    assert "| ★ | **run/teacher_gguf_q4_1** (reference) |" in text and "| run/teacher_fp32 | pytorch |" in text
    assert "15.0 (0.19x)" in text
    assert "| run | 9988776655 (dirty) |" in text  # the bench's own commit before the run's git.json


def test_a_folder_without_lm_benches_is_a_clear_error(tmp_path: Path) -> None:
    classifier = tmp_path / "job"
    classifier.mkdir()
    (classifier / "serve_bench.json").write_text(json.dumps({"rows": [{"arm": "student_fp32", "p50_ms": 3.0}]}))
    with pytest.raises(FileNotFoundError, match="no Hydra job folders"):
        report(tmp_path)
