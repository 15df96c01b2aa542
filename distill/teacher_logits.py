"""Precomputed teacher logits: one teacher pass over the training set, read back by every epoch.

The frozen teacher runs in eval mode, so its logits for an example never change: computing them
once and reading them from disk gives the same targets as the live teacher (up to float noise
from batch padding) at the cost of one forward pass per example instead of one per epoch. The
store is a safetensors file, memory-mapped on load, keyed by the teacher's weights and the
training examples (source file, tokenizer, ``max_length``, slice). Its metadata repeats the key,
and a store whose metadata or shape disagrees with the run is refused, never silently used.

With ``topk`` set the store holds, per example, the teacher's K largest logits, their indices and
the log of the softmax mass they leave out at the run's temperature (:mod:`distill.topk`), computed
batch by batch: the full ``N x C`` logits never exist, which is what a language-model vocabulary
needs. Such a store is keyed by K and the temperature too.
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
from distill.topk import TopKTargets, topk_targets

log = logging.getLogger(__name__)
MODES = ("none", "precompute")


def weights_fingerprint(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class TeacherLogitStore:
    """Teacher targets by training-example index: ``logits`` ``(N, C)`` fp32, or top-K tensors.

    Top-K stores hold ``values`` ``(N, K)``, ``indices`` ``(N, K)`` and ``rest_log_mass`` ``(N,)``,
    returned as :class:`distill.topk.TopKTargets` at the temperature in the metadata.
    """

    def __init__(self, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
        self.tensors = tensors
        self.metadata = metadata

    def __call__(self, example_index: Tensor) -> Tensor | TopKTargets:
        rows = {name: tensor[example_index.cpu()].to(example_index.device) for name, tensor in self.tensors.items()}
        if "logits" in rows:
            return rows["logits"]
        return TopKTargets(rows["values"], rows["indices"], rows["rest_log_mass"], float(self.metadata["temperature"]))

    @classmethod
    def load(cls, path: Path, expected: dict[str, str]) -> TeacherLogitStore:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            stale = {key: (metadata.get(key), value) for key, value in expected.items() if metadata.get(key) != value}
            if stale:
                raise ValueError(f"teacher-logit store {path} was built for another run (stored vs wanted): {stale}")
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)
        return cls(tensors, metadata)


@torch.inference_mode()
def compute_targets(
    teacher: nn.Module, datamodule: GlueDataModule, batch_size: int, topk: int | None = None, temperature: float = 1.0
) -> dict[str, Tensor]:
    """The store's tensors, filled batch by batch; top-K rows when ``topk`` is set."""
    teacher.eval()
    count = len(datamodule.splits["train"])
    tensors: dict[str, Tensor] = {}
    filled = torch.zeros(count, dtype=torch.bool)
    for batch in datamodule.dataloader("train", batch_size, shuffle=True):  # grouped by length: less padding
        index = batch.pop(EXAMPLE_INDEX)
        batch.pop("labels")
        logits = teacher(**batch).logits.float()
        rows = {"logits": logits} if topk is None else topk_targets(logits, topk, temperature)._asdict()
        for name, row in rows.items():
            if isinstance(row, Tensor):
                tensors.setdefault(name, row.new_zeros((count, *row.shape[1:])))[index] = row
        filled[index] = True
    if not filled.all():
        raise RuntimeError(f"the teacher pass left {int((~filled).sum())} examples without logits")
    return tensors


def precompute_teacher_logits(
    teacher: nn.Module, datamodule: GlueDataModule, cache_dir: str, topk: int | None = None, temperature: float = 1.0
) -> TeacherLogitStore:
    """Load the store for this teacher and training set, building it first if it does not exist."""
    if topk is not None and not 0 < topk <= datamodule.num_labels:
        raise ValueError(f"distill.teacher_cache_topk={topk!r} must be in [1, {datamodule.num_labels}] (the classes)")
    expected = {
        "teacher_weights": weights_fingerprint(teacher),
        "train_examples": datamodule.train_fingerprint(),
        "num_examples": str(len(datamodule.splits["train"])),
        "num_labels": str(datamodule.num_labels),
    }
    if topk is not None:  # full-logit stores keep their key: top-K adds its own fields
        expected |= {"topk": str(topk), "temperature": repr(float(temperature))}
    key = hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_dir).expanduser() / "teacher_logits"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{datamodule.task}-{key}.safetensors"
    with FileLock(str(path) + ".lock"):
        if not path.is_file():
            log.info("Computing teacher logits for %s training examples -> %s", expected["num_examples"], path)
            tensors = compute_targets(teacher, datamodule, datamodule.eval_batch_size, topk, temperature)
            partial = path.with_suffix(f".tmp-{os.getpid()}")
            save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(partial), metadata=expected)
            partial.chmod(0o644)  # readable by every job of a shared cache
            os.replace(partial, path)
        else:
            log.info("Reusing teacher logits %s", path)
    return TeacherLogitStore.load(path, expected)
