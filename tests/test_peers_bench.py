"""The peer bench (bench/peers/) on tiny random Llamas: the plain loop and TRL's GKDTrainer train two steps on
the same blocks in the same order, and each writes the record the bench's tables are made from."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from hydra.utils import instantiate
from transformers import AutoTokenizer

from bench.peers.common import compose_experiment, order_digest, size_overrides, training_batches, write_record
from bench.peers.run import run
from bench.peers.summary import records, seed_table, sweep_line
from bench.peers.sweep import sweep
from distill.utils.keys import EXAMPLE_INDEX
from tests.conftest import tiny_llama

FIELDS = {
    "arm", "seed", "size", "steps", "tokens", "order_digest", "wall_s", "train_s", "train_tokens_per_s",
    "wall_tokens_per_s", "peak_rss_mb", "process_s", "peak_rss_process_mb", "heldout_ppl", "eval_s", "loss",
    "recipe", "student_init", "command", "versions", "cpu",
}  # fmt: skip


@pytest.fixture
def tiny_bench(tmp_path: Path, lm_teacher_dir: Path, corpus: Path) -> tuple[list[str], Path]:
    """Overrides that point the experiment at the tiny teacher and corpus, and a 2-layer student beside it."""
    student = tmp_path / "student"
    tokenizer = AutoTokenizer.from_pretrained(lm_teacher_dir)
    tiny_llama(len(tokenizer), layers=2, seed=1).save_pretrained(student)
    tokenizer.save_pretrained(student)
    overrides = [
        f"teacher.name_or_path={lm_teacher_dir}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"data.data_dir={corpus}",
        "data.pattern=*.txt",
        "data.val_files=[work_3.txt]",
        "data.test_files=[work_4.txt]",
        "data.block_size=16",
    ]
    return overrides, student


def check_record(out: Path, arm: str) -> dict:
    record = json.loads((out / f"{arm}-seed7.json").read_text())
    assert record.keys() >= FIELDS
    assert (record["arm"], record["seed"], record["size"]) == (arm, 7, "smoke")
    assert (record["steps"], record["tokens"]) == (2, 8 * 15)  # 8 blocks of 16 tokens, batches of 4
    assert 0 < record["train_s"] <= record["wall_s"] <= record["process_s"]
    assert record["peak_rss_mb"] > 0 and record["heldout_ppl"] > 1
    assert record["versions"]["torch"] and "commit" in record["versions"]["distill"]
    assert record["recipe"]["batch_size"] == 4 and record["cpu"]["threads"] >= 1
    assert not list((out / "work" / f"{arm}-seed7").rglob("model.safetensors"))  # the trained student is not kept
    return record


def test_plain_and_trl_arms_train_the_same_blocks_and_write_their_records(tiny_bench, tmp_path: Path) -> None:
    """Two steps each; TRL, fed distill's batches through its sequential sampler, trains them in the plain loop's
    order (distill's training loader's)."""
    overrides, student = tiny_bench
    out = tmp_path / "results"
    arms = ["plain", "trl"] if importlib.util.find_spec("trl") else ["plain"]
    for arm in arms:
        # With no CE term the plain loop's loss is GKD's (forward KL, T = 1): the same optimizer, schedule and
        # blocks must then give the same student.
        run(arm, 7, blocks=8, eval_blocks=2, out=out, overrides=[*overrides, "distill.alpha=0"], student=student)
    records = [check_record(out, arm) for arm in arms]
    assert len({record["order_digest"] for record in records}) == 1
    assert records[0]["heldout_ppl"] == pytest.approx(records[-1]["heldout_ppl"], rel=1e-4)
    if len(arms) == 1:
        pytest.skip("trl is not installed (pip install -e .[peers]): only the plain arm ran")


@pytest.mark.slow
def test_distill_arm_trains_the_loaders_blocks_and_scores_as_distill_does(tiny_bench, tmp_path: Path) -> None:
    """`python -m distill.train` with the bench's callback: distill's training loader's blocks, in its order,
    the store built in the run, and the bench's held-out score equal to the run's own test perplexity."""
    overrides, student = tiny_bench
    out = tmp_path / "results"
    run("distill", 7, blocks=8, eval_blocks=2, out=out, overrides=overrides, student=student)
    record = check_record(out, "distill")
    datamodule = instantiate(compose_experiment(7, [*size_overrides(8, 2), *overrides]).data)
    datamodule.setup("fit")
    order = [row for batch in training_batches(datamodule, 1) for row in batch[EXAMPLE_INDEX].tolist()]
    assert record["order_digest"] == order_digest(order)
    metrics = record["distill_metrics"]
    assert record["heldout_ppl"] == pytest.approx(metrics["student/test_ppl"], rel=1e-6)
    assert metrics["energy/logit_store_seconds"] >= 0 and metrics["teacher_store/bytes_per_token"] > 0  # 0.1 s steps
    assert not (out / "work" / "distill-seed7" / "cache").exists()  # the run's own store is not kept


@pytest.mark.slow
def test_a_sweep_runs_its_jobs_in_one_process_over_one_store_and_times_each(tiny_bench, tmp_path: Path) -> None:
    """`python -m distill.train -m` over alpha: the first job builds the store, the second reads it; each job's
    record holds its own alpha, its own score, and a wall time that starts when the job before it was done."""
    overrides, student = tiny_bench
    out, store = tmp_path / "results", tmp_path / "store"
    found = sweep(7, 8, 2, out, [*overrides, "distill.alpha=0.5,0.2"], student=student, store=store)
    assert [record["sweep_job"] for record in found] == [0, 1]
    assert [record["overrides"][-1] for record in found] == ["distill.alpha=0.5", "distill.alpha=0.2"]
    for record in found:
        assert record["heldout_ppl"] == pytest.approx(record["distill_metrics"]["student/test_ppl"], rel=1e-6)
        assert 0 < record["train_s"] <= record["wall_s"] < record["process_s"]
    assert found[0]["heldout_ppl"] != found[1]["heldout_ppl"]
    assert len(list((store / "teacher_logits").glob("*.safetensors"))) == 1
    assert found[0]["wall_s"] + found[1]["wall_s"] < found[0]["process_s"]  # the first test and export left out
    with pytest.raises(SystemExit, match="no swept override"):
        sweep(7, 8, 2, out, overrides, student=student, store=store)


def test_summary_gives_each_arm_its_ratio_to_trl_and_a_sweep_its_trl_total(tmp_path: Path) -> None:
    def record(arm: str, seed: int, wall: float, overrides: tuple[str, ...] = ()) -> dict:
        figures = {"wall_s": wall, "train_s": wall / 2, "train_tokens_per_s": 100.0, "peak_rss_mb": 1000.0}
        return {"arm": arm, "seed": seed, "overrides": list(overrides), "heldout_ppl": 110.0, **figures}

    folder, sweep = tmp_path / "peers", tmp_path / "sweep"
    for name, value in [("trl-seed42", record("trl", 42, 600.0)), ("trl-seed43", record("trl", 43, 640.0)),
                        ("distill-seed42", record("distill", 42, 300.0))]:  # fmt: skip
        write_record(folder / f"{name}.json", value)
    write_record(sweep / "a.json", record("distill", 43, 500.0))
    write_record(sweep / "b.json", record("distill", 43, 250.0, ("distill.alpha=0.3",)))
    table = seed_table(records(folder))
    assert table[2] == "| 42 | distill | 300.0 (0.50x) | 150.0 (0.50x) | 100.0 (1.00x) | 1,000.0 (1.00x) | 110.0 |"
    assert table[4].startswith("| 43 | trl | 640.0 (1.00x)")
    runs = [json.loads(path.read_text()) for path in sorted(sweep.glob("*.json"))]
    line = sweep_line(runs, records(folder))
    assert line.endswith("distill 750.0 s, TRL 1,280.0 s (0.59x)") and "seed 43 distill.alpha=0.3" in line
    with pytest.raises(SystemExit, match=r"seed\(s\) \[44\]"):
        sweep_line([record("distill", 44, 1.0)], records(folder))
