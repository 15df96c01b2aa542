"""Distil a frozen teacher into a student, compressing it on the way.

    python -m distill.train experiment=bert_to_tiny [key=value ...]

Composes the Hydra config in conf/, prints it, builds data, teacher (fine-tuned and cached
on first use), student, module, callbacks, loggers and trainer from their `_target_`s, then
fits, tests the best checkpoint on the dev set and exports the student with its metrics.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from distill.models.student import check_same_vocabulary, transformer_layer_params
from distill.models.teacher import Teacher
from distill.modules.distillation import DistillationModule
from distill.schemas import register_schemas, validate
from distill.utils.instantiate import instantiate_named
from distill.utils.run_record import count_parameters, git_state, record_student, write_json

log = logging.getLogger("distill.train")


def build_module(cfg: DictConfig, teacher: Teacher, student: Any, num_labels: int) -> DistillationModule:
    return DistillationModule(
        student=student,
        teacher=teacher.model,
        num_labels=num_labels,
        temperature=cfg.distill.temperature,
        alpha=cfg.distill.alpha,
        optimizer=instantiate(cfg.distill.optimizer),
        warmup_ratio=cfg.distill.warmup_ratio,
    )


def best_checkpoint(trainer: pl.Trainer) -> str | None:
    callback = trainer.checkpoint_callback
    return callback.best_model_path if callback is not None and callback.best_model_path else None


def summarize(teacher: Teacher, module: DistillationModule, results: dict[str, float], started: float) -> dict:
    student_counts = count_parameters(module.student)
    teacher_counts = count_parameters(teacher.model)
    return {
        "teacher/val_acc": results.get("test/teacher_acc"),
        "teacher/finetune_val_acc": teacher.val_acc,
        "teacher/params": teacher_counts["params"],
        "teacher/layer_params": transformer_layer_params(teacher.model),
        "student/val_acc": results["test/acc"],
        "student/agreement": results.get("test/agreement"),
        "student/params": student_counts["params"],
        "student/nonzero_params": student_counts["nonzero_params"],
        "student/layer_params": transformer_layer_params(module.student),
        "wall_time_s": round(time.time() - started, 1),
    }


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one distillation job; returns the metrics also written to metrics.json."""
    started = time.time()
    validate(cfg)
    output_dir = Path(cfg.paths.output_dir)
    write_json(output_dir / "git.json", git_state())
    pl.seed_everything(cfg.seed, workers=True)

    log.info("Instantiating data <%s>", cfg.data._target_)
    datamodule = instantiate(cfg.data)
    log.info("Instantiating teacher <%s>", cfg.teacher._target_)
    teacher = instantiate(cfg.teacher, datamodule=datamodule)
    log.info("Instantiating student <%s>", cfg.student._target_)
    student = instantiate(cfg.student, teacher=teacher)
    check_same_vocabulary(teacher, student)
    record_student(output_dir, student)
    module = build_module(cfg, teacher, student, datamodule.num_labels)

    callbacks = instantiate_named(cfg.get("callbacks"), "callbacks")
    callbacks += instantiate_named(cfg.get("compression"), "compression")
    loggers = instantiate_named(cfg.get("logger"), "logger")
    log.info("Instantiating trainer <%s>", cfg.trainer._target_)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    run_facts = {"teacher/finetune_val_acc": teacher.val_acc, **count_parameters(student)}
    for logger in loggers:
        logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), **run_facts})

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    (results,) = trainer.test(module, datamodule=datamodule, ckpt_path=best_checkpoint(trainer))

    metrics = summarize(teacher, module, results, started)
    if trainer.is_global_zero:
        if cfg.export:
            module.student.save_pretrained(output_dir / "student")
            datamodule.tokenizer.save_pretrained(output_dir / "student")
        write_json(output_dir / "metrics.json", metrics)
        for logger in loggers:
            logger.log_metrics({f"final/{key}": value for key, value in metrics.items() if value is not None})
    log.info("Metrics: %s", metrics)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    print(OmegaConf.to_yaml(cfg, resolve=True))
    try:
        train(cfg)
    finally:
        log.info("Run folder: %s", cfg.paths.output_dir)
        finish_wandb()


def finish_wandb() -> None:
    """Close a W&B run even after a failure, so the next job of a sweep starts clean."""
    import wandb

    if wandb.run is not None:
        wandb.finish()


def cli() -> None:
    """Console entry point (`distill-train`); the schemas must be known before Hydra composes."""
    register_schemas()
    main()


if __name__ == "__main__":
    cli()
