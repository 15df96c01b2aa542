"""The teacher: a Hugging Face model of the task's kind, fine-tuned on the task first when asked.

For a causal LM this is Minitron's "teacher correction": a short cross-entropy stage on the
training split, so that the teacher's distribution matches the data the student distils on.

A fine-tuned teacher is stored with ``save_pretrained`` under ``cache_dir`` in a folder keyed
by model, task and every setting that changes it, so later runs and sweep jobs reuse it. A
file lock makes concurrent jobs wait for the one that trains it; the folder appears by an
atomic rename, so a half-written teacher is never read.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from filelock import FileLock
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from distill.data.base import DataModule
from distill.tasks.base import Task
from distill.utils.references import resolve
from distill.utils.scratch import written_whole
from distill.utils.settings import settings_of

log = logging.getLogger(__name__)
INFO_FILE = "teacher_info.json"


@dataclass
class Teacher:
    """A prepared teacher: the model, where it was loaded from, the task it serves (which the student
    builders ask for the model class) and its validation score if fine-tuned here, on ``metric``.

    A served teacher (``teacher=endpoint``) has no ``model`` in this process: ``client`` asks the server, and
    ``path`` names its tokenizer (and the weights a student cut from the teacher starts from, if open)."""

    model: PreTrainedModel | None
    path: str
    task: Task
    val_score: float | None = None
    client: Any = None  # distill.serve.endpoint.EndpointClient; Any keeps the serving client out of this import

    @property
    def metric(self) -> str:
        """The task's monitored metric, e.g. ``val/acc`` or ``val/ppl``."""
        return self.task.monitor


@dataclass
class FinetuneSettings:
    """``teacher.finetune_settings``: the cross-entropy stage of a teacher with ``finetune=true`` (see
    :func:`finetune_model`). The dev set is checked ``val_checks_per_epoch`` times per epoch and the best
    weights become the teacher; ``dropout`` None keeps the model's own, a number replaces every dropout."""

    epochs: int = 1
    max_steps: int = -1
    lr: float = 5e-5
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    seed: int = 0
    val_checks_per_epoch: int = 1
    dropout: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio={self.warmup_ratio!r} is outside [0.0, 1.0]")


def teacher_cache_key(name_or_path: str, datamodule: DataModule, settings: dict[str, Any]) -> str:
    spec = {
        # Bumped when fine-tuning changes what it makes from the same settings.
        # 2: each epoch visits the length-grouped batches in a new order (epoch 2 replayed epoch 1's before).
        "recipe": 2,
        "model": name_or_path,
        "task": datamodule.task,
        **datamodule.teacher_key_fields(),
        "settings": settings,
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '--', name_or_path)}-{datamodule.task}-{digest}"


def prepare_teacher(
    name_or_path: str,
    datamodule: DataModule,
    task: Task,
    finetune: bool = False,
    cache_dir: str = "",
    finetune_settings: FinetuneSettings | None = None,
) -> Teacher:
    """Load the teacher (hub id, folder or GGUF file), fine-tuning it on the task (or reusing the cached result)."""
    if not finetune:
        path = resolve(name_or_path)
        model = task.auto_model.from_pretrained(path)
        labels = datamodule.num_labels
        if labels is not None and model.config.num_labels != labels:
            raise ValueError(
                f"teacher {name_or_path!r} has num_labels={model.config.num_labels}, the task "
                f"{datamodule.task!r} has {labels}; set teacher.finetune=true to fine-tune it"
            )
        return Teacher(model=model.eval(), path=path, task=task)
    settings = asdict(settings_of(FinetuneSettings, finetune_settings))
    target = Path(cache_dir).expanduser() / teacher_cache_key(name_or_path, datamodule, settings)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / INFO_FILE).is_file():
            _finetune_into(target, name_or_path, datamodule, settings, task)
        else:
            log.info("Reusing the fine-tuned teacher in %s", target)
    info = json.loads((target / INFO_FILE).read_text())
    model = task.auto_model.from_pretrained(target)
    return Teacher(model=model, path=str(target), task=task, val_score=info[metric_key(task)])


def metric_key(task: Task) -> str:
    return task.monitor.replace("/", "_")


def _finetune_into(
    target: Path, name_or_path: str, datamodule: DataModule, settings: dict[str, Any], task: Task
) -> None:
    """Fine-tune with cross-entropy into a scratch folder, then rename it into place."""
    log.info("Fine-tuning teacher %s on %s (cache: %s)", name_or_path, datamodule.task, target)
    started = time.time()
    with written_whole(target) as scratch:  # a failed or killed fine-tuning leaves no folder behind
        model, score, steps = finetune_model(resolve(name_or_path), datamodule, scratch, task, **settings)
        model.save_pretrained(scratch)
        datamodule.tokenizer.save_pretrained(scratch)
        info = {
            "source": name_or_path,
            "task": datamodule.task,
            metric_key(task): score,
            "steps": steps,
            "settings": settings,
            "wall_time_s": round(time.time() - started, 1),
        }
        (scratch / INFO_FILE).write_text(json.dumps(info, indent=2))
    log.info("Teacher fine-tuned: %s %.4f in %.0f s", task.monitor, score, info["wall_time_s"])


def set_dropout(config: PretrainedConfig, probability: float) -> None:
    """Set every dropout probability of a Hugging Face config (hidden, attention, classifier...)."""
    names = [name for name, value in config.to_dict().items() if "dropout" in name and isinstance(value, float)]
    if not names:
        raise ValueError(f"teacher.finetune_settings.dropout={probability!r}: {type(config).__name__} has no dropout")
    for name in names:
        setattr(config, name, probability)


def finetune_model(
    name_or_path: str,
    datamodule: DataModule,
    log_dir: Path,
    task: Task,
    *,
    epochs: int,
    max_steps: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    warmup_ratio: float,
    seed: int,
    val_checks_per_epoch: int = 1,
    dropout: float | None = None,
) -> tuple[PreTrainedModel, float, int]:
    """Cross-entropy fine-tuning (the distillation module with ``alpha=1`` and no teacher).

    The validation set is checked ``val_checks_per_epoch`` times per epoch and the best weights are kept,
    the same selection the distillation stage applies to its student. ``dropout`` (if not None)
    replaces every dropout probability in the model config; the saved teacher keeps it.
    """
    from distill.modules.distillation import DistillationModule

    pl.seed_everything(seed, workers=True)
    module = DistillationModule(
        student=_trainable_model(name_or_path, task, dropout),
        teacher=None,
        num_labels=None,
        task=task,
        temperature=1.0,
        alpha=1.0,
        optimizer=functools.partial(torch.optim.AdamW, lr=lr, weight_decay=weight_decay),
        warmup_ratio=warmup_ratio,
    )
    best = ModelCheckpoint(
        dirpath=log_dir / "checkpoints", monitor=task.monitor, mode=task.monitor_mode, save_weights_only=True
    )
    trainer = _finetune_trainer(log_dir, best, epochs, max_steps, val_checks_per_epoch)
    datamodule.prepare_data()
    datamodule.setup("fit")
    trainer.fit(
        module,
        train_dataloaders=datamodule.dataloader("train", batch_size, shuffle=True),
        val_dataloaders=datamodule.val_dataloader(),
    )
    # No checkpoint when max_steps ends fine-tuning before the first dev check: keep the final weights.
    selected = best.best_model_path or None
    (result,) = trainer.validate(module, datamodule.val_dataloader(), ckpt_path=selected, verbose=False)
    shutil.rmtree(log_dir / "checkpoints", ignore_errors=True)
    return module.student.eval(), float(result[task.monitor]), trainer.global_step


def _trainable_model(name_or_path: str, task: Task, dropout: float | None) -> PreTrainedModel:
    config = AutoConfig.from_pretrained(name_or_path, **task.model_kwargs())
    if dropout is not None:
        set_dropout(config, dropout)
    model = task.auto_model.from_pretrained(name_or_path, config=config)
    # from_pretrained returns eval mode (dropout off); Lightning keeps module modes as it finds them.
    return model.train()


def _finetune_trainer(
    log_dir: Path, best: ModelCheckpoint, epochs: int, max_steps: int, val_checks_per_epoch: int
) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        max_steps=max_steps,
        logger=CSVLogger(log_dir, name="finetune_logs"),
        callbacks=[best],
        val_check_interval=1.0 / val_checks_per_epoch,
        gradient_clip_val=1.0,
        devices=1,
        # One process even inside a multi-task SLURM/torchrun job: the other ranks wait on the cache lock.
        plugins=[LightningEnvironment()],
        num_sanity_val_steps=0,
        log_every_n_steps=50,
    )
