"""The stages a distillation run goes through before ``fit``, and the module they assemble.

The teacher stage itself is :func:`distill.models.teacher.prepare_teacher`; after it come the
teacher's generations (prompt/response data only), the teacher-logit store (``teacher_cache``) and
the :class:`~distill.modules.distillation.DistillationModule` with its optional on-policy sampler.
Each stage is cached on disk, so a rerun or a sweep's later jobs skip it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from distill.data.base import DataModule
from distill.models.teacher import Teacher, prepare_teacher
from distill.modules.distillation import DistillationModule
from distill.modules.on_policy import OnPolicy, OnPolicySettings
from distill.serve.generation import end_token_ids
from distill.stores.generations import served_logit_store
from distill.stores.teacher_logits import TeacherLogitStore, precompute_teacher_logits
from distill.tasks.base import Task
from distill.utils.keys import weights_fingerprint
from distill.utils.settings import settings_of

log = logging.getLogger("distill.train")


def teacher_logit_store(
    cfg: DictConfig, teacher: Teacher, datamodule: DataModule, world_size: int
) -> TeacherLogitStore | None:
    cached = cfg.distill.teacher_cache == "precompute" and cfg.distill.alpha < 1
    if not cached:
        return None
    settings = cfg.distill
    if teacher.client is not None:
        return served_store(settings, teacher, datamodule)
    # The perturbed copies differ every epoch and rank: the store labels as many epochs as the run
    # trains, drawn by as many ranks.
    epochs = max(cfg.trainer.get("max_epochs") or 1, 1)
    return precompute_teacher_logits(
        teacher.model,
        datamodule,
        cfg.paths.cache_dir,
        settings.teacher_cache_topk,
        settings.temperature,
        epochs,
        world_size,
        settings.teacher_cache_dtype,
        settings.teacher_cache_temperatures,
    )


def served_store(settings: DictConfig, teacher: Teacher, datamodule: DataModule) -> TeacherLogitStore:
    """The logit store of a served teacher: its top-k log-probabilities along its own responses, stored with
    them by the generation stage, so no teacher runs here (:func:`distill.pipeline.checks.check_served` has
    refused the settings it cannot serve)."""
    served_k = teacher.client.settings.top_logprobs
    if settings.teacher_cache_topk != served_k:
        log.warning(
            "distill.teacher_cache_topk=%s: the served store holds the server's top-%d (teacher.top_logprobs)",
            settings.teacher_cache_topk,
            served_k,
        )
    datamodule.setup("fit")
    return served_logit_store(datamodule.responses["train"], datamodule.splits["train"], datamodule.max_length)


def generation_stage(datamodule: DataModule, teacher: Teacher) -> dict[str, float]:
    """The teacher's responses to a prompt pool, for data modules that train on them (cached); none for others."""
    answers = teacher.client if teacher.client is not None else teacher.model
    return {f"generation/{key}": value for key, value in datamodule.attach_teacher(answers).items()}


def student_source(teacher: Teacher, student: DictConfig, datamodule: DataModule, task: Task) -> Teacher:
    """The teacher a student builder reads: a served teacher's weights (``teacher.name_or_path``) are loaded here
    only for a student cut from them, and dropped with the builder's reference; a pretrained student needs none."""
    if teacher.model is not None or student._target_ == "distill.models.student.from_pretrained":
        return teacher
    log.info("Loading the served teacher's weights %s to cut the student from", teacher.path)
    return prepare_teacher(teacher.path, datamodule, task)


@dataclass
class StageSettings:
    """The keys of ``distill`` that configure the stages around the module, not the module: the teacher-logit
    store (:func:`teacher_logit_store`) and the on-policy sampler (:func:`on_policy_sampler`).

    ``teacher_cache``: ``precompute`` runs the frozen teacher once over the training set and reads its logits
    from a cached store (:mod:`distill.stores.teacher_logits`) in every epoch and every later run; ``none``
    asks the live teacher. With ``precompute``, ``teacher_cache_topk`` keeps only the teacher's K largest
    logits per example and the mass they leave out at the module's temperature (:mod:`distill.losses.topk`),
    for output spaces too large to store (``None``: all logits); ``teacher_cache_dtype`` ``float16`` halves
    the stored top-K logits (offsets from each position's largest), for token-level stores.
    ``teacher_cache_temperatures``: more temperatures a top-K store keeps the rest mass at (4 bytes per
    position each), so that the runs of a sweep over ``distill.temperature`` that lists its values here
    share one teacher pass; a run at a temperature its store lacks rebuilds the store.
    """

    teacher_cache: str = "none"
    teacher_cache_topk: int | None = None
    teacher_cache_dtype: str = "float32"
    teacher_cache_temperatures: list[float] = field(default_factory=list)
    on_policy: OnPolicySettings = field(default_factory=OnPolicySettings)

    def __post_init__(self) -> None:
        if self.teacher_cache not in ("none", "precompute"):
            raise ValueError(f"distill.teacher_cache={self.teacher_cache!r} must be 'none' or 'precompute'")
        if self.teacher_cache_dtype != "float32" and self.teacher_cache_topk is None:
            raise ValueError(
                f"distill.teacher_cache_dtype={self.teacher_cache_dtype!r} needs distill.teacher_cache_topk"
            )
        for value in self.teacher_cache_temperatures:
            if not value > 0:
                raise ValueError(f"distill.teacher_cache_temperatures has {value!r}; temperatures must be > 0")
        if self.teacher_cache_topk is not None and self.teacher_cache != "precompute":
            raise ValueError(
                f"distill.teacher_cache_topk={self.teacher_cache_topk!r} needs distill.teacher_cache=precompute"
            )


STAGE_KEYS = tuple(setting.name for setting in fields(StageSettings))


def build_module(
    cfg: DictConfig,
    task: Task,
    teacher: Teacher,
    student: Any,
    datamodule: DataModule,
    teacher_logits: TeacherLogitStore | None,
) -> DistillationModule:
    """The module built from ``distill``'s settings and the run's objects."""
    log.info("Instantiating module <%s>", cfg.distill._target_)
    return module_partial(cfg.distill)(
        student=student,
        teacher=teacher.model,
        num_labels=datamodule.num_labels,
        task=task,
        teacher_logits=teacher_logits,
        teacher_memo=teacher_memo_file(cfg, teacher, task) if teacher.model is not None else None,
        on_policy=on_policy_sampler(cfg, datamodule, teacher),
    )


def module_partial(settings: DictConfig) -> Callable[..., DistillationModule]:
    """``distill`` instantiated from its ``_target_`` with ``_partial_: true``: the module's own settings bound,
    its objects (student, teacher, task, store, sampler) to come. The stages' keys (:class:`StageSettings`)
    are left out rather than made module arguments: the module takes what the stages build from them (the
    store, the sampler), and a second, config-shaped description of the same things would be one too many."""
    values = OmegaConf.to_container(settings, resolve=True)
    return instantiate({key: value for key, value in values.items() if key not in STAGE_KEYS})


def on_policy_sampler(cfg: DictConfig, datamodule: DataModule, teacher: Teacher) -> OnPolicy | None:
    """GKD's student sampling when ``distill.on_policy.probability`` (λ) > 0; it needs prompts to sample from."""
    settings = settings_of(OnPolicySettings, cfg.distill.on_policy)
    if settings.probability == 0:
        return None
    if not datamodule.prompt_pool:
        raise ValueError(
            f"distill.on_policy.probability={settings.probability} samples responses to prompts: it needs "
            f"prompt/response data (e.g. data=shakespeare_prompts), not {type(datamodule).__name__}"
        )
    end_ids = end_token_ids(teacher.model, datamodule.tokenizer)
    return OnPolicy(settings, pad_id=datamodule.pad_id, end_ids=end_ids, seed=cfg.seed)


def teacher_memo_file(cfg: DictConfig, teacher: Teacher, task: Task) -> Path:
    """Where the teacher's evaluation answers persist: one file per teacher (by weights) and task."""
    return (
        Path(cfg.paths.cache_dir).expanduser() / "teacher_eval" / f"{task.name}-{weights_fingerprint(teacher.model)}.pt"
    )
