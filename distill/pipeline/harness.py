"""Standard evaluation: lm-evaluation-harness tasks on saved causal LMs (the exported student, the teacher).

lm-eval (the optional ``harness`` extra) scores a ``save_pretrained`` folder with its ``hf`` model type on
tasks named online (its registry) or by local task YAMLs (``include_path``; conf/harness_tasks/ ships an
offline one over Shakespeare's sonnets). The YAMLs may name files under ``${DISTILL_DATA_DIR}``, filled
in with the run's data folder, so one YAML serves every checkout. Scores come back flat, as
``harness/<model>/<task>/<metric>`` floats, for metrics.json and the loggers.
"""

from __future__ import annotations

import logging
import math
import shutil
import string
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from distill.config.cli import CONFIG_DIR
from distill.config.schemas import HarnessSchema
from distill.utils.references import resolve

log = logging.getLogger(__name__)

MISSING_EXTRA = "lm-evaluation-harness not installed (no lm_eval): pip install 'distill[harness]'"
# The offline tasks this package ships: the include path when none is given.
SHIPPED_TASKS = Path(CONFIG_DIR) / "harness_tasks"
# lm-eval's `hf` model type loads AutoModelForCausalLM: the harness scores causal-LM runs.
CAUSAL_LM = "distill.tasks.CausalLMTask"


def harness_settings(cfg: Any) -> HarnessSchema | None:
    """``cfg.harness`` when it names tasks; None when it is off, or absent from a config made without the schema
    (a run folder's config from before the option, a test's hand-made one)."""
    node = cfg.get("harness")
    return HarnessSchema(**node) if node and node.tasks else None


def run_models(cfg: Any, output_dir: Path, teacher_path: str | None) -> dict[str, str]:
    """The models ``cfg.harness`` scores after a training run: the exported student and the teacher's folder."""
    wanted = set(cfg.harness.models)
    if "student" in wanted and not cfg.export:
        raise ValueError("harness.models names student but export=false: set export=true or harness.models=[teacher]")
    if "teacher" in wanted and not teacher_path:
        raise ValueError(f"harness.models names teacher but teacher {cfg.teacher._target_} has no name_or_path")
    models = {"student": str(output_dir / "student"), "teacher": teacher_path}
    return {name: reference for name, reference in models.items() if name in wanted}


def run_harness(cfg: Any, output_dir: Path, teacher: Any) -> dict[str, float]:
    """``cfg.harness``'s scores of a finished training run (none when it names no task). The teacher is scored
    from the folder it was loaded from: after ``teacher.finetune`` (teacher correction), the corrected one."""
    settings = harness_settings(cfg)
    if settings is None:
        return {}
    models = run_models(cfg, output_dir, getattr(teacher, "path", None))  # a served teacher has no folder
    return harness_scores(settings, models, cfg.paths.data_dir)


def eval_harness(cfg: Any) -> dict[str, float]:
    """``cfg.harness``'s scores in ``python -m distill.eval``: of student_path, and of teacher_path when set."""
    settings = harness_settings(cfg)
    if settings is None:
        return {}
    models = {"student": cfg.student_path, "teacher": cfg.get("teacher_path")}
    models = {name: reference for name, reference in models.items() if reference and name in settings.models}
    return harness_scores(settings, models, cfg.paths.data_dir)


def harness_scores(settings: HarnessSchema, models: dict[str, str], data_dir: str) -> dict[str, float]:
    """``harness/<model>/<task>/<metric>`` of each model (a folder, hub id or GGUF file) on ``settings.tasks``."""
    evaluator, _ = import_lm_eval()
    scores: dict[str, float] = {}
    with task_manager(settings, data_dir) as tasks:  # every task known before any model loads
        for name, reference in models.items():
            log.info("lm-evaluation-harness: %s (%s) on %s", name, reference, ", ".join(settings.tasks))
            results = evaluator(**evaluate_arguments(resolve(reference), settings, tasks))
            scores |= flat_scores(name, results["results"])
    return scores


def check_harness(cfg: Any) -> None:
    """A run's ``harness`` refused before its teacher stage: lm-eval missing, an unknown task, a model it lacks."""
    settings = harness_settings(cfg)
    if settings is None:
        return
    if cfg.task._target_ != CAUSAL_LM:
        tasks = list(settings.tasks)
        raise ValueError(f"harness.tasks={tasks} scores causal LMs, not {cfg.task._target_}: set harness.tasks=[]")
    run_models(cfg, Path(cfg.paths.output_dir), cfg.teacher.get("name_or_path"))
    with task_manager(settings, cfg.paths.data_dir) as tasks:
        log.info("lm-evaluation-harness tasks found: %s (of %d)", ", ".join(settings.tasks), len(tasks.all_tasks))


@contextmanager
def task_manager(settings: HarnessSchema, data_dir: str) -> Iterator[Any]:
    """lm-eval's TaskManager over the filled include path, once every task in ``settings`` is found in it."""
    _, task_manager_class = import_lm_eval()
    with tempfile.TemporaryDirectory(prefix="distill_harness_") as folder:
        include = filled_task_folder(Path(settings.include_path or SHIPPED_TASKS), data_dir, Path(folder))
        tasks = task_manager_class(include_path=str(include))
        check_tasks(settings.tasks, tasks, settings.include_path)
        yield tasks


def import_lm_eval() -> tuple[Any, Any]:
    """lm-eval's ``simple_evaluate`` and ``TaskManager``: an optional extra, refused in one line when absent."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError(MISSING_EXTRA) from error
    return simple_evaluate, TaskManager


def filled_task_folder(source: Path, data_dir: str, target: Path) -> Path:
    """A copy of the task folder ``source`` whose YAMLs have ``${DISTILL_DATA_DIR}`` set to ``data_dir``
    (lm-eval reads no environment variables); Python files beside them (``!function``) come along."""
    if not source.is_dir():
        raise FileNotFoundError(f"harness.include_path={str(source)!r} is not a folder of lm-eval task YAMLs")
    shutil.copytree(source, target, dirs_exist_ok=True)
    for yaml_file in target.rglob("*.yaml"):
        text = string.Template(yaml_file.read_text()).safe_substitute(DISTILL_DATA_DIR=str(Path(data_dir).resolve()))
        yaml_file.write_text(text)
    return target


def check_tasks(tasks: list[str], task_manager: Any, include_path: str | None) -> None:
    unknown = [task for task in tasks if task not in task_manager.all_tasks]
    if unknown:
        folder = include_path or SHIPPED_TASKS
        raise ValueError(
            f"harness.tasks={unknown}: neither an lm-eval task nor a task YAML in {folder}; name a registered task"
            f" (lm_eval --tasks list) or set harness.include_path to the folder of its YAML"
        )


def evaluate_arguments(folder: str, settings: HarnessSchema, task_manager: Any) -> dict[str, Any]:
    """``simple_evaluate``'s arguments for the model saved in ``folder``, in float32 on the CPU."""
    model_args: dict[str, Any] = {"pretrained": folder, "dtype": "float32"}
    prefix = prefix_token(folder)
    if prefix is not None:
        model_args["prefix_token_id"] = prefix
    return {
        "model": "hf",
        "model_args": model_args,
        "tasks": list(settings.tasks),
        "task_manager": task_manager,
        "limit": settings.limit,
        "batch_size": settings.batch_size,
        "device": "cpu",
        "log_samples": False,
    }


def prefix_token(folder: str) -> int | None:
    """lm-eval starts a rolling log-likelihood from the BOS (else EOS) token; a tokenizer with neither (BERT's,
    as the tests' tiny models have) starts from its CLS token, which begins every sequence it encodes."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.bos_token_id is not None or tokenizer.eos_token_id is not None:
        return None
    return tokenizer.cls_token_id


def flat_scores(model: str, results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """lm-eval's ``{task: {"metric,filter": value}}`` as ``harness/<model>/<task>/<metric>`` floats (the
    filter is named only when it is not lm-eval's "none"; the alias and "N/A" standard errors are left out)."""
    scores = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, _, kept = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                name = metric if kept in ("", "none") else f"{metric}_{kept}"
                scores[f"harness/{model}/{task}/{name}"] = float(value)
    return scores
