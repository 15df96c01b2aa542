"""Precomputed teacher logits: one teacher pass over the training set, read back by every epoch.

The frozen teacher runs in eval mode, so its logits for an example never change: computing them
once and reading them from disk gives the same targets as the live teacher (up to float noise
from batch padding) at the cost of one forward pass per example instead of one per epoch. The
store is a safetensors file, memory-mapped on load, keyed by the teacher's weights and the
training examples (source file, tokenizer, ``max_length``, slice). Its metadata repeats the key,
and a store whose metadata or shape disagrees with the run is refused, never silently used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from distill.data.glue import EXAMPLE_INDEX, GlueDataModule

log = logging.getLogger(__name__)
MODES = ("none", "precompute")


def weights_fingerprint(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class TeacherLogitStore:
    """``(num_examples, num_classes)`` fp32 teacher logits, read by training-example index."""

    def __init__(self, logits: Tensor, metadata: dict[str, str]) -> None:
        self.logits = logits
        self.metadata = metadata

    def __call__(self, example_index: Tensor) -> Tensor:
        return self.logits[example_index.cpu()].to(example_index.device)

    @classmethod
    def load(cls, path: Path, expected: dict[str, str]) -> TeacherLogitStore:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            stale = {key: (metadata.get(key), value) for key, value in expected.items() if metadata.get(key) != value}
            if stale:
                raise ValueError(f"teacher-logit store {path} was built for another run (stored vs wanted): {stale}")
            logits = handle.get_tensor("logits")
        return cls(logits, metadata)


@torch.inference_mode()
def compute_logits(teacher: nn.Module, datamodule: GlueDataModule, batch_size: int) -> Tensor:
    teacher.eval()
    count = len(datamodule.splits["train"])
    logits = torch.full((count, datamodule.num_labels), float("nan"))
    for batch in datamodule.dataloader("train", batch_size, shuffle=True):  # grouped by length: less padding
        index = batch.pop(EXAMPLE_INDEX)
        batch.pop("labels")
        logits[index] = teacher(**batch).logits.float()
    if torch.isnan(logits).any():
        raise RuntimeError("the teacher pass left examples without logits")
    return logits


def precompute_teacher_logits(teacher: nn.Module, datamodule: GlueDataModule, cache_dir: str) -> TeacherLogitStore:
    """Load the store for this teacher and training set, building it first if it does not exist."""
    expected = {
        "teacher_weights": weights_fingerprint(teacher),
        "train_examples": datamodule.train_fingerprint(),
        "num_examples": str(len(datamodule.splits["train"])),
        "num_labels": str(datamodule.num_labels),
    }
    key = hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_dir).expanduser() / "teacher_logits"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{datamodule.task}-{key}.safetensors"
    with FileLock(str(path) + ".lock"):
        if not path.is_file():
            log.info("Computing teacher logits for %s training examples -> %s", expected["num_examples"], path)
            logits = compute_logits(teacher, datamodule, datamodule.eval_batch_size)
            partial = path.with_suffix(f".tmp-{os.getpid()}")
            save_file({"logits": logits.contiguous()}, str(partial), metadata=expected)
            partial.chmod(0o644)  # readable by every job of a shared cache
            os.replace(partial, path)
        else:
            log.info("Reusing teacher logits %s", path)
    return TeacherLogitStore.load(path, expected)
