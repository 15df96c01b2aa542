"""The metrics a distillation run ends with, and where they go (metrics.json, every logger)."""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch.loggers import WandbLogger

from distill.data.base import DataModule
from distill.models.student import transformer_layer_params
from distill.models.teacher import Teacher
from distill.modules.distillation import DistillationModule
from distill.pruning.compression_report import report_rows
from distill.stores.teacher_logits import TeacherLogitStore
from distill.utils.run_record import count_parameters


def summarize(teacher: Teacher, module: DistillationModule, results: dict[str, float], started: float) -> dict:
    student_counts = count_parameters(module.student)
    return {
        **module.task.summary(results),
        finetune_key(teacher): teacher.val_score,
        **teacher_size(teacher),
        "student/params": student_counts["params"],
        f"student/trained_{module.task.target_unit}": module.trained_targets_all_ranks(),
        "student/nonzero_params": student_counts["nonzero_params"],
        "student/layer_params": transformer_layer_params(module.student),
        "global_step": module.global_step,
        **(module.on_policy.metrics() if module.on_policy is not None else {}),
        "wall_time_s": round(time.time() - started, 1),
    }


def teacher_size(teacher: Teacher) -> dict[str, int]:
    """The teacher's parameters; a served teacher's are the server's, not counted here."""
    if teacher.model is None:
        return {}
    return {
        "teacher/params": count_parameters(teacher.model)["params"],
        "teacher/layer_params": transformer_layer_params(teacher.model),
    }


def store_facts(store: TeacherLogitStore | None, datamodule: DataModule) -> dict[str, float]:
    if store is None:
        return {}
    positions = datamodule.positions_per_example
    unit = "token" if positions > 1 else "example"
    return {f"teacher_store/bytes_per_{unit}": store.bytes_per_position(positions)}


def finetune_key(teacher: Teacher) -> str:
    return f"teacher/finetune_{teacher.metric.replace('/', '_')}"


def log_final(loggers: list, metrics: dict[str, Any], layers: list) -> None:
    """Final metrics to every logger; the per-layer table and the accuracy-vs-size point to W&B."""
    for logger in loggers:
        logger.log_metrics({f"final/{key}": value for key, value in metrics.items() if value is not None})
        if isinstance(logger, WandbLogger) and layers:
            columns, rows = report_rows(layers)
            logger.log_table(key="compression/layers", columns=columns, data=rows)
            point = [
                "student/val_acc",
                "compression/size_bytes",
                "compression/linear_sparsity",
                "compression/size_ratio",
            ]
            logger.log_table(key="compression/frontier_point", columns=point, data=[[metrics.get(k) for k in point]])
