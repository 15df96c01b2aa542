"""Distil a frozen teacher into a student, compressing it on the way.

    python -m distill.train experiment=bert_to_tiny [key=value ...]

Composes the Hydra config in conf/, prints it, builds data, teacher (fine-tuned and cached
on first use), student, module, callbacks, loggers and trainer from their `_target_`s, then
fits, tests the best checkpoint on the dev set and exports the student with its metrics.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from distill.config.cli import CONFIG_DIR
from distill.config.schemas import register_schemas
from distill.data.base import DataModule
from distill.models.student import check_context, check_same_tokenizer, shared_vocabulary
from distill.modules.distillation import DistillationModule
from distill.pipeline.checks import check_run
from distill.pipeline.export import export_student
from distill.pipeline.harness import run_harness
from distill.pipeline.interrupt import LastCheckpointOnSigterm, ends_on_signal, stops_on_signal
from distill.pipeline.metrics import finetune_key, log_final, store_facts, summarize
from distill.pipeline.stages import build_module, generation_stage, student_source, teacher_logit_store
from distill.utils.devices import warn_if_emulated_bf16
from distill.utils.instantiate import instantiate_named
from distill.utils.run_meter import RunMeter
from distill.utils.run_record import count_parameters, git_state, record_student, write_json
from distill.utils.sharding import unsharded

log = logging.getLogger("distill.train")


def best_checkpoint(trainer: pl.Trainer) -> str | None:
    callback = trainer.checkpoint_callback
    return callback.best_model_path if callback is not None and callback.best_model_path else None


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one distillation job; returns the metrics also written to metrics.json."""
    started = time.time()
    check_run(cfg)  # every setting a stage would refuse, refused before the first stage runs
    output_dir = Path(cfg.paths.output_dir)
    write_json(output_dir / "git.json", git_state())
    pl.seed_everything(cfg.seed, workers=True)

    if cfg.student.get("name_or_path"):  # a pretrained student: the same tokenizer, before any stage runs
        check_same_tokenizer(cfg.teacher.name_or_path, cfg.student.name_or_path)
    # Callbacks first: a bad compression setting fails before the teacher stage spends any time.
    compression = instantiate_named(cfg.get("compression"), "compression")
    callbacks = instantiate_named(cfg.get("callbacks"), "callbacks") + compression
    log.info("Instantiating data <%s>", cfg.data._target_)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()  # the user's files read and checked (a row without its column) before the teacher stage
    task = instantiate(cfg.task)
    log.info("Instantiating teacher <%s>", cfg.teacher._target_)
    with RunMeter(1, measure=rank_zero_only.rank == 0, stage="teacher_stage") as teacher_meter:
        teacher = instantiate(cfg.teacher, datamodule=datamodule, task=task)
    check_context(teacher.model, datamodule)
    with RunMeter(1, measure=rank_zero_only.rank == 0, stage="generation") as generation_meter:
        generation = generation_stage(datamodule, teacher)
    loggers = instantiate_named(cfg.get("logger"), "logger")
    log.info("Instantiating trainer <%s>", cfg.trainer._target_)
    trainer = instantiate(cfg.trainer, callbacks=[*callbacks, LastCheckpointOnSigterm()], logger=loggers or False)
    warn_if_emulated_bf16(trainer)
    with RunMeter(trainer.world_size, measure=trainer.is_global_zero, stage="logit_store") as store_meter:
        teacher_logits = teacher_logit_store(cfg, teacher, datamodule, trainer.world_size)
    # The teacher stage and the logit pass run only when their caches are empty: reseed so that the
    # student's run is the same whether they ran in this process or not.
    pl.seed_everything(cfg.seed, workers=True)
    log.info("Instantiating student <%s>", cfg.student._target_)
    student = instantiate(
        cfg.student, teacher=student_source(teacher, cfg.student, datamodule, task), datamodule=datamodule
    )
    task.vocabulary = shared_vocabulary(teacher, student, datamodule.tokenizer)
    record_student(output_dir, student)
    module = build_module(cfg, task, teacher, student, datamodule, teacher_logits)

    run_facts = {finetune_key(teacher): teacher.val_score, **count_parameters(student)}
    for logger in loggers:
        logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), **run_facts})

    # A signal during fit or test ends the run with 128 + signal and an incomplete metrics.json.
    with stops_on_signal(trainer, output_dir, run_facts), RunMeter(trainer.world_size, trainer.is_global_zero) as meter:
        before = evaluate_before_fit(trainer, module, datamodule) if cfg.evaluate_before_fit else {}
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        # The best validation of the final student: for a compressed one, only validations after its
        # compression is complete count (callbacks/checkpoint.py); with none, it is tested as fit left it.
        test_from = best_checkpoint(trainer)
        (results,) = trainer.test(module, datamodule=datamodule, ckpt_path=test_from)

    metrics = {"complete": True} | summarize(teacher, module, results, started) | before
    metrics |= store_facts(teacher_logits, datamodule) | generation | meter.metrics()
    metrics |= teacher_meter.metrics() | store_meter.metrics()
    metrics |= generation_meter.metrics() if generation else {}
    student, teacher_model = unsharded(module.student), unsharded(teacher.model)  # collectives under FSDP
    if trainer.is_global_zero:
        report, layers = export_student(student, task, datamodule, output_dir, callbacks, teacher_model, cfg.export)
        metrics |= report | run_harness(cfg, output_dir, teacher)  # lm-evaluation-harness, when harness.tasks is set
        write_json(output_dir / "metrics.json", metrics)
        log_final(loggers, metrics, layers)
    log.info("Metrics: %s", metrics)
    return metrics


def evaluate_before_fit(trainer: pl.Trainer, module: DistillationModule, datamodule: DataModule) -> dict[str, float]:
    """The student's test metrics as built (e.g. right after structured pruning), before any training."""
    (results,) = trainer.test(module, datamodule=datamodule, verbose=False)
    return {f"student_before_fit/{key.removeprefix('test/')}": value for key, value in results.items()}


def objective(cfg: DictConfig, metrics: dict[str, Any]) -> float:
    """The number a sweeper optimises: ``objective.metric``, unless the student is over budget."""
    budget, size = cfg.objective.max_size_bytes, metrics.get("compression/size_bytes")
    if budget is not None and size is not None and size > budget:
        return cfg.objective.over_budget_score
    return metrics[cfg.objective.metric]


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    print(OmegaConf.to_yaml(cfg, resolve=True))
    # Outermost: a run stopped by a signal, in any stage, exits 128 + signal and its last line says how to go on.
    with ends_on_signal("distill.train", Path(cfg.paths.output_dir), resumes=True):
        try:
            metrics = train(cfg)
            # Only global rank 0 exports, so only it holds the export's metrics; a sweeper reads rank 0.
            return objective(cfg, metrics) if rank_zero_only.rank == 0 else None
        finally:
            log.info("Run folder: %s", cfg.paths.output_dir)
            finish_wandb()


def finish_wandb() -> None:
    """Close a W&B run even after a failure, so the next job of a sweep starts clean. A run without the
    W&B logger never imported wandb, and need not have it installed."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def cli() -> None:
    """Console entry point (`distill-train`); the schemas must be known before Hydra composes."""
    register_schemas()
    main()


if __name__ == "__main__":
    cli()
