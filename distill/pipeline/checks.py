"""The check phase: what an entry point can refuse without loading a model, refused before its first long stage.

A model is read here only as its ``config.json`` (or a GGUF file's header) and built on the meta device, which
gives every layer's shape without memory or weights: the student shapes, N:M widths and top-K bounds the
stages would refuse minutes later are refused in seconds. Paths are checked to exist, GGUF files to be whole,
and the cache to be writable with room for the stores the run will build (a rough estimate: rows x positions
x bytes per position). Each refusal is one line naming the setting or path and what to set instead.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from distill.config.schemas import check_teacher_cache_topk, validate
from distill.models.student import check_student
from distill.pipeline.harness import check_harness
from distill.pruning.oneshot.sequential import OneShotSettings, check_targets
from distill.utils.references import converted_copy, converted_path, default_cache_dir, gguf_elements, gguf_file
from distill.utils.scratch import CACHE_SETTING, remove_stale_scratch

log = logging.getLogger(__name__)
FLOAT32_BYTES = 4
SERVED_TEACHER = "distill.models.served_teacher.served_teacher"


def model_config(key: str, reference: str) -> PretrainedConfig:
    """The config of the model ``key`` names (hub id, folder or GGUF file), without its weights."""
    source = check_reference(key, reference)
    with named(key, reference):
        if source is None:
            return AutoConfig.from_pretrained(reference)
        copy = converted_copy(source)
        if copy is not None:
            return AutoConfig.from_pretrained(copy)
        return AutoConfig.from_pretrained(source.parent, gguf_file=source.name)


def check_reference(key: str, reference: str) -> Path | None:
    """A path-like reference must exist and a GGUF file be whole (a truncated one is refused here, not after
    minutes of loading; one already de-quantized is known whole); returns the GGUF file, if it is one."""
    with named(key, reference):
        source = gguf_file(reference)
        if source is not None and converted_copy(source) is None:
            gguf_elements(source)
        return source


@contextmanager
def named(key: str, reference: str) -> Iterator[None]:
    try:
        yield
    except (OSError, ValueError) as error:
        raise type(error)(f"{key}={reference!r}: {one_line(error)}") from None


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def skeleton(config: PretrainedConfig, auto_model: Any) -> nn.Module:
    """The model ``config`` describes, on the meta device: its layers' shapes, without memory or weights."""
    with torch.device("meta"):
        return auto_model.from_config(config)


def check_cache(folder: Path, needed_bytes: int = 0) -> None:
    """``folder`` must be writable with ``needed_bytes`` free; unfinished entries of dead processes are removed."""
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else one_line(error)
        raise OSError(error.errno, f"cache folder {folder} is not writable ({reason}): {CACHE_SETTING}") from None
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise OSError(
            errno.ENOSPC,
            f"cache folder {folder} has {free / 2**20:.0f} MiB free; this run's stores need about "
            f"{needed_bytes / 2**20:.0f} MiB: {CACHE_SETTING}",
        )
    remove_stale_scratch(folder)


def conversion_bytes(reference: str) -> int:
    """The bytes :func:`distill.utils.references.resolve` writes for ``reference``: a GGUF file not yet
    de-quantized becomes float32 weights in the default cache; anything else writes nothing."""
    source = gguf_file(reference)
    if source is None or (converted_path(source, "float32") / "config.json").is_file():
        return 0
    return gguf_elements(source) * FLOAT32_BYTES


def check_model_cache(reference: str) -> None:
    """Room in the default cache (where GGUF files are de-quantized) for ``reference``'s conversion."""
    needed = conversion_bytes(reference)
    if needed:
        check_cache(default_cache_dir() / "models", needed)


def logit_store_bytes(cfg: DictConfig, vocabulary: int) -> int:
    """A rough size of the teacher-logit store: rows x positions x bytes per position (0 if unknown or none)."""
    settings, data = cfg.distill, cfg.data
    if settings.teacher_cache != "precompute" or settings.alpha >= 1:
        return 0
    rows = data.get("train_limit_blocks") or data.get("train_limit") or 0
    positions = data.get("block_size") or 1
    value_bytes = 2 if settings.get("teacher_cache_dtype") == "float16" else 4
    topk = settings.teacher_cache_topk
    if topk is None:
        per_position = (data.get("num_labels") or vocabulary) * value_bytes
    else:  # values, indices and the rest mass at each temperature
        temperatures = {settings.temperature, *(settings.get("teacher_cache_temperatures") or ())}
        per_position = topk * (value_bytes + (2 if vocabulary < 2**16 else 4)) + 4 * len(temperatures)
    return rows * positions * per_position


def check_run(cfg: DictConfig) -> None:
    """Everything :func:`distill.train.train` can refuse before its teacher stage, refused now."""
    from hydra.utils import instantiate

    validate(cfg)
    check_harness(cfg)
    config = model_config("teacher.name_or_path", cfg.teacher.name_or_path)
    if cfg.student.get("name_or_path"):
        check_reference("student.name_or_path", cfg.student.name_or_path)
    check_student(cfg.student, skeleton(config, instantiate(cfg.task).auto_model))
    vocabulary = getattr(config, "vocab_size", None)
    if cfg.data.get("num_labels") is None and vocabulary is not None:  # a causal LM: the vocabulary bounds K
        check_teacher_cache_topk(cfg.distill.teacher_cache_topk, vocabulary, "the teacher's vocabulary size")
    check_model_cache(cfg.teacher.name_or_path)
    check_cache(Path(cfg.paths.cache_dir), logit_store_bytes(cfg, vocabulary or 0))
    if cfg.data.get("streaming"):
        check_streaming(cfg)
    if cfg.teacher._target_ == SERVED_TEACHER:
        check_served(cfg.distill, cfg.teacher.get("top_logprobs", 0), cfg.data.get("train_on"))


def check_streaming(cfg: DictConfig) -> None:
    """A streamed corpus has no length to plan the schedule by and no fixed blocks to key a store by."""
    if cfg.trainer.get("max_steps", -1) < 1:
        raise ValueError("data.streaming=true has no length to plan the epoch by: set trainer.max_steps=<steps>")
    if cfg.distill.teacher_cache == "precompute" and cfg.distill.alpha < 1:
        raise ValueError(
            "data.streaming=true has no fixed set of training blocks for distill.teacher_cache=precompute to store"
            " the teacher's logits of: set distill.teacher_cache=none (the live teacher)"
        )


def check_served(settings: DictConfig, served_k: int, train_on: str | None) -> None:
    """What a served teacher (no logits in this process) cannot do: a logit store other than its top-k along its
    own responses at temperature 1, or grading the student's on-policy samples."""
    if settings.get("on_policy", {}).get("probability", 0) > 0:
        raise ValueError(
            f"distill.on_policy.probability={settings.on_policy.probability}: a served teacher (teacher=endpoint)"
            " cannot grade the student's samples; set distill.on_policy.probability=0"
        )
    if settings.teacher_cache != "precompute" or settings.alpha >= 1:
        return
    if settings.temperature != 1:
        raise ValueError(
            f"distill.temperature={settings.temperature}: a served teacher's log-probabilities are at"
            " temperature 1; set distill.temperature=1"
        )
    if served_k == 0 or train_on != "responses":
        raise ValueError(
            f"distill.teacher_cache=precompute from a served teacher reads its top-k along its responses: it needs"
            f" teacher.top_logprobs > 0 (now {served_k}) and data.train_on=responses (now {train_on}); else set"
            " distill.teacher_cache=none"
        )


def check_oneshot(
    reference: str, auto_model: Any, settings: OneShotSettings, include: Any, exclude: Any = ()
) -> None:  # fmt: skip
    """One-shot pruning's layer checks (targets, N:M widths) on ``reference``'s shapes, before it loads."""
    check_targets(skeleton(model_config("model", reference), auto_model), settings, include, exclude)
    check_model_cache(reference)


def check_model(key: str, reference: str) -> PretrainedConfig:
    """The model ``key`` names exists (and a GGUF file is whole), with room to de-quantize it; its config."""
    config = model_config(key, reference)
    check_model_cache(reference)
    return config


def check_saved_model(key: str, path: str) -> None:
    """``path`` is a saved model folder: a missing one would otherwise be taken for a hub id."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{key}={path!r} is no folder: give a saved model's folder, e.g. <run>/student")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{key}={path!r} holds no config.json: give a saved model's folder, e.g. <run>/student")
