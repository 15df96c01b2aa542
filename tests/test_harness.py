"""Standard evaluation (distill.pipeline.harness): lm-evaluation-harness on saved causal LMs, offline.

The shipped task (conf/harness_tasks/shakespeare_sonnets.yaml) runs on the tiny Llama over a folder of made-up
sonnets laid out as ${DISTILL_DATA_DIR}/shakespeare/sonnets_gut.txt, directly and after a training run.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from distill.config.schemas import HarnessSchema
from distill.eval import evaluate
from distill.pipeline.harness import MISSING_EXTRA, harness_scores
from distill.train import train
from tests.test_causal_lm import tiny_run
from tests.test_serve_bench import corpus_overrides

pytest.importorskip("lm_eval", reason="lm-evaluation-harness missing (pip install 'distill[harness]')")

TASK = "shakespeare_sonnets"
METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")
UNKNOWN = r"^harness.tasks=\['no_such_task'\]: neither an lm-eval task nor a task YAML in .*include_path"


@pytest.fixture
def sonnets_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data folder holding shakespeare/sonnets_gut.txt: a title, then numbered 14-line sonnets."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    sonnets = [
        f"{number}\n\n" + "\n".join(f"Line {j} of sonnet {number}, fair and true." for j in range(14))
        for number in ("I", "II", "III")
    ]
    folder = tmp_path / "data" / "shakespeare"
    folder.mkdir(parents=True)
    (folder / "sonnets_gut.txt").write_text("THE SONNETS\n\n\n" + "\n\n\n".join(sonnets) + "\n")
    return tmp_path / "data"


def assert_scores(scores: dict[str, float], model: str, documents: int) -> None:
    for metric in METRICS:
        value = scores[f"harness/{model}/{TASK}/{metric}"]
        assert math.isfinite(value) and value > 0, (model, metric, value)
    assert scores[f"harness/{model}/{TASK}/sample_len"] == documents


@pytest.mark.slow
def test_the_shipped_task_scores_a_saved_model_offline(lm_teacher_dir: Path, sonnets_root: Path) -> None:
    scores = harness_scores(HarnessSchema(tasks=[TASK], batch_size=2), {"tiny": str(lm_teacher_dir)}, str(sonnets_root))
    assert_scores(scores, "tiny", documents=3)  # the title and the numerals are no sonnets
    # A random model over a 30k-token vocabulary: about as surprised as uniform guessing, per byte.
    assert 1.0 < scores[f"harness/tiny/{TASK}/bits_per_byte"] < 20.0


@pytest.mark.slow
def test_train_puts_the_student_and_teacher_scores_into_metrics_json(
    compose_train, lm_teacher_dir: Path, corpus: Path, sonnets_root: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    cfg = compose_train(
        "experiment=smollm2_to_small",
        "debug=smoke",
        f"paths.output_dir={run}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.data_dir={sonnets_root}",
        *tiny_run(lm_teacher_dir, corpus),
        f"harness.tasks=[{TASK}]",
        "harness.limit=2",
    )
    metrics = train(cfg)
    written = json.loads((run / "metrics.json").read_text())
    for model in ("student", "teacher"):
        assert_scores(written, model, documents=2)
        assert written[f"harness/{model}/{TASK}/bits_per_byte"] == metrics[f"harness/{model}/{TASK}/bits_per_byte"]


@pytest.mark.slow
def test_eval_scores_a_saved_student_and_a_teacher(
    compose_train, lm_teacher_dir: Path, corpus: Path, sonnets_root: Path, tmp_path: Path
) -> None:
    cfg = compose_train(
        f"student_path={lm_teacher_dir}",
        f"teacher_path={lm_teacher_dir}",
        "task=causal_lm",
        *corpus_overrides(corpus),
        f"paths.output_dir={tmp_path / 'eval'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.data_dir={sonnets_root}",
        "latency.batch_sizes=[]",
        f"harness.tasks=[{TASK}]",
        "harness.limit=1",
        config_name="eval",
    )
    results = evaluate(cfg)
    for model in ("student", "teacher"):
        assert_scores(results, model, documents=1)
    # the same folder twice: the same scores
    assert results[f"harness/student/{TASK}/bits_per_byte"] == results[f"harness/teacher/{TASK}/bits_per_byte"]


@pytest.mark.slow  # lm-eval indexes its whole task registry first (~15 s)
def test_an_unknown_task_is_refused_before_any_model_loads(sonnets_root: Path) -> None:
    settings = HarnessSchema(tasks=[TASK, "no_such_task"])
    with pytest.raises(ValueError, match=UNKNOWN):
        harness_scores(settings, {"student": "/no/such/model"}, str(sonnets_root))


@pytest.mark.slow  # lm-eval indexes its whole task registry first (~15 s)
def test_a_run_with_an_unknown_task_fails_before_its_teacher_stage(
    compose_train, lm_teacher_dir: Path, corpus: Path, sonnets_root: Path, tmp_path: Path
) -> None:
    run, cache = tmp_path / "run", tmp_path / "cache"
    overrides = [f"paths.output_dir={run}", f"paths.cache_dir={cache}", f"paths.data_dir={sonnets_root}"]
    cfg = compose_train(
        "experiment=smollm2_to_small", *overrides, *tiny_run(lm_teacher_dir, corpus), "harness.tasks=[no_such_task]"
    )
    with pytest.raises(ValueError, match=UNKNOWN):
        train(cfg)
    assert not (run / "metrics.json").exists() and not any(cache.glob("*"))


def test_a_missing_extra_is_named_in_one_line(monkeypatch: pytest.MonkeyPatch, sonnets_root: Path) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(ImportError, match=r"^lm-evaluation-harness not installed .*pip install 'distill\[harness\]'$"):
        harness_scores(HarnessSchema(tasks=[TASK]), {"student": "/no/such/model"}, str(sonnets_root))
    assert MISSING_EXTRA.endswith("pip install 'distill[harness]'")


def test_harness_settings_are_checked_at_composition(compose_train, tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException, match=r"harness\.task"):
        compose_train("harness.task=[x]")  # mistyped: the schema has `tasks`
    with pytest.raises(ValueError, match=r"models=\['judge'\] unknown"):
        HarnessSchema(models=["judge"])
    assert compose_train().harness.tasks == []  # off by default


def test_a_classification_run_with_harness_tasks_is_refused(compose_train, tmp_path: Path) -> None:
    from distill.pipeline.checks import check_run

    cfg = compose_train(f"paths.output_dir={tmp_path / 'run'}", f"harness.tasks=[{TASK}]")
    with pytest.raises(ValueError, match=r"scores causal LMs, not distill\.tasks\.ClassificationTask"):
        check_run(cfg)
