"""Precomputed teacher logits: one teacher pass over the training set, read back by every epoch.

The frozen teacher runs in eval mode, so its logits for an example never change: computing them
once and reading them from disk gives the same targets as the live teacher (up to float noise
from batch padding) at the cost of one forward pass per example instead of one per epoch. The
store is a safetensors file, memory-mapped on load, keyed by the teacher's weights and the
training examples (source file, tokenizer, ``max_length``, slice). Its metadata repeats the key,
and a store whose metadata or shape disagrees with the run is refused, never silently used.

With ``topk`` set the store holds, per example, the teacher's K largest logits, their indices and
the log of the softmax mass they leave out (:mod:`distill.losses.topk`), computed batch by batch: the
full ``N x C`` logits never exist, which is what a language-model vocabulary needs. Such a store is
keyed by K too. The logits and indices are the same at every temperature; the rest mass is not, so
the store keeps it at each of a list of temperatures (the run's and ``distill.teacher_cache_temperatures``)
and its metadata names them. A run at a temperature the store lacks rebuilds it for the union, so the
runs of a temperature sweep that lists its values share one teacher pass.

Token-level stores (causal LMs: one row per block of packed text, ``(L, K)`` per row) keep the
class indices in the narrowest integer type the output space allows (``uint16`` below 65,536
classes) and, with ``value_dtype="float16"``, each position's K logits as half-precision offsets
from its largest one (softmax ignores the offset): 2K + 2K + 4 bytes per position, 260 at K=64.
Both are widened back (``int64``, ``float32``) when read.

With ``data.augment`` on, a second store holds the teacher's targets on the perturbed copies the
training loader draws (:class:`CopyLogitStore`), so that no training step runs the teacher.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader

from distill.losses.topk import TopKTargets, largest_logits, outside_log_masses
from distill.utils.devices import on_gpu_if_any, to_device
from distill.utils.keys import COPY_FINGERPRINT, EXAMPLE_INDEX, pop_copies, weights_fingerprint
from distill.utils.scratch import written_whole

if TYPE_CHECKING:  # the stores read data modules through their contract and import no data module
    from distill.data.base import DataModule

log = logging.getLogger(__name__)
MODES = ("none", "precompute")


class TeacherLogitStore:
    """Teacher targets by training-example index: ``logits`` ``(N, C)`` fp32, or top-K tensors.

    Top-K stores hold ``values`` ``(N, K)``, ``indices`` ``(N, K)`` and ``rest_log_mass`` ``(N, len(T))``
    at the temperatures ``T`` the metadata lists, returned as :class:`distill.losses.topk.TopKTargets` at
    the one :meth:`at` picked (the first by default).
    """

    def __init__(self, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
        self.tensors = tensors
        self.metadata = metadata
        self.temperatures = listed_temperatures(metadata)
        self.column = 0
        # The targets on the training loader's perturbed copies, when the run has copies and they replay.
        self.copies: CopyLogitStore | None = None

    def at(self, temperature: float) -> TeacherLogitStore:
        """Serve the targets at ``temperature``, which must be one the store holds."""
        if float(temperature) not in self.temperatures:
            raise ValueError(
                f"distill.temperature={temperature!r}: this teacher-logit store holds the rest mass at T in "
                f"{list(self.temperatures)} only"
            )
        self.column = self.temperatures.index(float(temperature))
        if self.copies is not None:
            self.copies.at(temperature)
        return self

    def __call__(self, example_index: Tensor) -> Tensor | TopKTargets:
        rows = {name: tensor[example_index.cpu()].to(example_index.device) for name, tensor in self.tensors.items()}
        if "logits" in rows:
            return rows["logits"]
        rest = rows["rest_log_mass"][..., self.column]
        return TopKTargets(rows["values"].float(), rows["indices"].long(), rest, self.temperatures[self.column])

    def bytes_per_position(self, positions_per_row: int = 1) -> float:
        """Stored bytes per example (classification) or per token (``positions_per_row`` = block length)."""
        rows = int(self.metadata["num_examples"])
        return sum(t.numel() * t.element_size() for t in self.tensors.values()) / (rows * positions_per_row)

    @classmethod
    def load(cls, path: Path, expected: dict[str, str]) -> TeacherLogitStore:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            stale = {key: (metadata.get(key), value) for key, value in expected.items() if metadata.get(key) != value}
            if stale:
                raise ValueError(f"teacher-logit store {path} was built for another run (stored vs wanted): {stale}")
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)
        return cls(tensors, metadata)


def copy_rows(epoch: int, example_index: Tensor, copies: int, count: int) -> Tensor:
    """Store rows of a batch's copies, laid out copy after copy as the collator builds them:
    copy ``c`` of example ``i`` drawn in ``epoch`` is row ``(epoch * copies + c) * count + i``."""
    copy_number = torch.arange(copies).repeat_interleave(len(example_index))
    return (epoch * copies + copy_number) * count + example_index.cpu().repeat(copies)


class CopyLogitStore(TeacherLogitStore):
    """Teacher targets on the perturbed copies of the training loader, by epoch, copy and example.

    The copies are random but reproducible: each rank's loader draws them from one stream seeded by
    the data seed (:mod:`distill.data.augment`) over batches fixed by the seed, the epoch and the
    rank, so replaying the loaders yields the very copies a run trains on. Each row keeps the copy's
    fingerprint, and a batch whose copies differ from the stored ones (a mid-epoch resume, DataLoader
    workers, another number of ranks, more epochs than stored) gets ``None``: the live teacher labels
    it instead.
    """

    def lookup(self, epoch: int, example_index: Tensor, fingerprint: Tensor) -> Tensor | TopKTargets | None:
        epochs, copies, count = (int(self.metadata[key]) for key in ("epochs", "copies", "num_examples"))
        if epoch >= epochs:
            return None
        rows = copy_rows(epoch, example_index, copies, count)
        if not torch.equal(self.tensors["fingerprint"][rows], fingerprint.cpu()):
            return None
        return self(rows.to(example_index.device))


SIGNED_VIEW = {torch.uint16: torch.int16}
TEMPERATURES = "temperatures"


def listed_temperatures(metadata: dict[str, str]) -> tuple[float, ...]:
    """The temperatures a top-K store's metadata lists (none for a store of full logits)."""
    listed = metadata.get(TEMPERATURES)
    return tuple(float(value) for value in listed.split(",")) if listed else ()


def temperature_metadata(temperatures: tuple[float, ...]) -> dict[str, str]:
    return {TEMPERATURES: ",".join(repr(float(value)) for value in temperatures)} if temperatures else {}


def index_dtype(classes: int) -> torch.dtype:
    """The narrowest integer type that holds class ids ``0 .. classes - 1``."""
    for dtype in (torch.uint8, torch.uint16, torch.int32):
        if classes - 1 <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def compact_targets(
    logits: Tensor, topk: int, temperatures: tuple[float, ...], value_dtype: torch.dtype
) -> dict[str, Tensor]:
    """The stored top-K rows of ``logits``: the K largest, their indices, the rest mass at each temperature."""
    logits = logits.float()  # once, for both: a bf16 teacher's logits
    values, indices = largest_logits(logits, topk)
    rest = outside_log_masses(logits, indices, temperatures)
    if value_dtype != torch.float32:  # offsets from the largest logit keep half precision where it matters
        values = values - values.amax(dim=-1, keepdim=True)
    indices = indices.to(index_dtype(logits.shape[-1]))
    return {"values": values.to(value_dtype), "indices": indices, "rest_log_mass": rest}


def write_targets(
    tensors: dict[str, Tensor],
    rows: Tensor,
    logits: Tensor,
    count: int,
    topk: int | None,
    temperatures: tuple[float, ...],
    value_dtype: torch.dtype = torch.float32,
) -> None:
    """Put the targets of ``logits`` (full, or top-K with the rest mass at ``temperatures``) at ``rows`` of
    ``count``-row tensors."""
    full = topk is None
    targets = {"logits": logits.float()} if full else compact_targets(logits, topk, temperatures, value_dtype)
    for name, value in targets.items():
        if isinstance(value, Tensor):
            value = value.cpu()  # the store is written from host memory, wherever the teacher ran
            stored = tensors.setdefault(name, value.new_zeros((count, *value.shape[1:])))
            # torch has no index_put for uint16: write through a same-width signed view.
            signed = SIGNED_VIEW.get(value.dtype)
            if signed is None:
                stored[rows] = value
            else:
                stored.view(signed)[rows] = value.view(signed)


@torch.inference_mode()
def compute_targets(
    teacher: nn.Module,
    datamodule: DataModule,
    batch_size: int,
    topk: int | None = None,
    value_dtype: torch.dtype = torch.float32,
    classes: int | None = None,
    temperatures: tuple[float, ...] = (),
) -> dict[str, Tensor]:
    """The store's tensors, filled batch by batch; top-K rows when ``topk`` is set; the first ``classes``
    logits only (``None``: all)."""
    teacher.eval()
    count = len(datamodule.splits["train"])
    tensors: dict[str, Tensor] = {}
    filled = torch.zeros(count, dtype=torch.bool)
    with on_gpu_if_any(teacher) as device:
        for batch in datamodule.dataloader("train", batch_size, shuffle=True):  # grouped by length: less padding
            index = batch.pop(EXAMPLE_INDEX)
            batch.pop("labels")
            logits = teacher(**to_device(batch, device)).logits[..., :classes]
            write_targets(tensors, index, logits, count, topk, temperatures, value_dtype)
            filled[index] = True
    if not filled.all():
        raise RuntimeError(f"the teacher pass left {int((~filled).sum())} examples without logits")
    return tensors


@torch.inference_mode()
def compute_copy_targets(
    teacher: nn.Module,
    datamodule: DataModule,
    epochs: int,
    topk: int | None = None,
    replicas: int = 1,
    temperatures: tuple[float, ...] = (),
) -> dict[str, Tensor]:
    """Replay ``epochs`` epochs of the training loader of each of ``replicas`` data-parallel ranks
    and label every perturbed copy they draw, on the device the main pass uses (:func:`compute_targets`)."""
    teacher.eval()
    count, copies = len(datamodule.splits["train"]), datamodule.augmenter.copies
    total = epochs * copies * count
    tensors: dict[str, Tensor] = {"fingerprint": torch.zeros(total, dtype=torch.long)}
    filled = torch.zeros(total, dtype=torch.bool)
    with on_gpu_if_any(teacher) as device:
        for rank in range(replicas):
            # Each rank's loader has its own collator, so its copies come from its own stream.
            loader = datamodule.dataloader("train", datamodule.batch_size, True, augment=True, shard=(rank, replicas))
            for epoch, batch in replay(loader, epochs):
                rows = copy_rows(epoch, batch[EXAMPLE_INDEX], copies, count)
                logits = teacher(**to_device(pop_copies(batch), device)).logits
                write_targets(tensors, rows, logits, total, topk, temperatures)
                tensors["fingerprint"][rows] = batch[COPY_FINGERPRINT]
                filled[rows] = True
    # Data parallelism trims the batches that do not divide among the ranks: their rows stay empty.
    if replicas == 1 and not filled.all():
        raise RuntimeError(f"the replay left {int((~filled).sum())} perturbed copies without logits")
    return tensors


def replay(loader: DataLoader, epochs: int) -> Iterator[tuple[int, dict[str, Tensor]]]:
    """``(epoch, batch)`` over ``epochs`` epochs of a length-grouped training loader."""
    for epoch in range(epochs):
        loader.batch_sampler.set_epoch(epoch)  # as Lightning does at each epoch start
        for batch in loader:
            yield epoch, batch


def copies_replay(datamodule: DataModule) -> bool:
    """Whether a replay of the training loaders draws the copies training will: one stream per rank,
    fixed batches (DataLoader workers draw from streams seeded per worker and epoch)."""
    return datamodule.augmenter is not None and datamodule.group_by_length and datamodule.num_workers == 0


def load_or_build(
    store_type: type[TeacherLogitStore],
    path: Path,
    expected: dict[str, str],
    build: Callable[..., dict[str, Tensor]],
    temperatures: tuple[float, ...] = (),
) -> TeacherLogitStore:
    """Load the store at ``path``, first building it with ``build(temperatures=...)`` (one process at a time)
    if absent or short of one of ``temperatures``: then for those and the ones it held."""
    with FileLock(str(path) + ".lock"):
        held = stored_temperatures(path)
        if held is None or not set(temperatures) <= set(held):
            wanted = tuple(sorted({*temperatures, *(held or ())}))
            examples = f"{expected['num_examples']} training examples"
            if "copies" in expected:
                examples = f"{expected['copies']} perturbed copies of {examples}, {expected['epochs']} epoch(s)"
            if held is not None:
                log.info("The teacher logits %s hold the rest mass at T in %s: rebuilding for %s", path, held, wanted)
            log.info("Computing teacher logits for %s -> %s", examples, path)
            tensors = {name: tensor.contiguous() for name, tensor in build(temperatures=wanted).items()}
            with written_whole(path) as unfinished:
                save_file(tensors, str(unfinished), metadata=expected | temperature_metadata(wanted))
                unfinished.chmod(0o644)  # readable by every job of a shared cache
        else:
            log.info("Reusing teacher logits %s", path)
    return store_type.load(path, expected)


def stored_temperatures(path: Path) -> tuple[float, ...] | None:
    """The temperatures of the store at ``path``; ``None`` when there is none."""
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        return listed_temperatures(handle.metadata() or {})


def store_path(cache_dir: str, name: str, expected: dict[str, str]) -> Path:
    key = hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_dir).expanduser() / "teacher_logits"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}-{key}.safetensors"


def precompute_teacher_logits(
    teacher: nn.Module,
    datamodule: DataModule,
    cache_dir: str,
    topk: int | None = None,
    temperature: float = 1.0,
    epochs: int = 1,
    replicas: int = 1,
    value_dtype: str = "float32",
    temperatures: Sequence[float] = (),
) -> TeacherLogitStore:
    """Load the stores for this teacher and training set, building them if absent; the copies' store
    holds the copies ``replicas`` data-parallel ranks draw in ``epochs`` epochs. A top-K store serves
    ``temperature`` and also holds the rest mass at ``temperatures``, for later runs at those."""
    # Token stores cover the tokenizer's ids: rows that only pad the teacher's embedding are no token's.
    classes = datamodule.num_labels or min(teacher.config.vocab_size, len(datamodule.tokenizer))
    if topk is not None and not 0 < topk <= classes:
        raise ValueError(f"distill.teacher_cache_topk={topk!r} must be in [1, {classes}] (the classes)")
    if value_dtype not in ("float32", "float16"):
        raise ValueError(f"distill.teacher_cache_dtype={value_dtype!r}; expected float32 or float16")
    expected = {
        "teacher_weights": weights_fingerprint(teacher),
        "train_examples": datamodule.train_fingerprint(),
        "num_examples": str(len(datamodule.splits["train"])),
        "num_labels": str(classes),
    }
    wanted: tuple[float, ...] = ()
    if topk is not None:  # full-logit stores keep their key: top-K adds its own fields
        expected["topk"] = str(topk)
        wanted = tuple(sorted({float(temperature), *(float(value) for value in temperatures)}))
    if value_dtype != "float32":  # float32 stores keep their key
        expected["value_dtype"] = value_dtype
    path = store_path(cache_dir, datamodule.task, expected)
    build = partial(compute_targets, teacher, datamodule, datamodule.eval_batch_size, topk, getattr(torch, value_dtype))
    store = load_or_build(TeacherLogitStore, path, expected, partial(build, classes=classes), wanted)
    if copies_replay(datamodule):
        copy_expected = expected | copies_key(datamodule, epochs, replicas)
        path = store_path(cache_dir, f"{datamodule.task}-copies", copy_expected)
        build = partial(compute_copy_targets, teacher, datamodule, epochs, topk, replicas)
        store.copies = load_or_build(CopyLogitStore, path, copy_expected, build, wanted)
    return store.at(temperature) if topk is not None else store


def copies_key(datamodule: DataModule, epochs: int, replicas: int = 1) -> dict[str, str]:
    """What decides the copies the training loaders draw: perturbation settings, seed, batches, ranks."""
    augmenter = dataclasses.asdict(datamodule.augmenter)
    augmenter["special_ids"] = sorted(augmenter["special_ids"])
    key = {
        "augment": json.dumps(augmenter, sort_keys=True),
        "copies": str(datamodule.augmenter.copies),
        "seed": str(datamodule.seed),
        "batch_size": str(datamodule.batch_size),
        "epochs": str(epochs),
    }
    if replicas > 1:  # single-process stores keep their key
        key["data_parallel_ranks"] = str(replicas)
    return key
