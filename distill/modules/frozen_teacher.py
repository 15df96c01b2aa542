"""The frozen teacher as the distillation module holds it: outside the module tree, so it is never
in ``parameters()``, the optimizer, checkpoints or saved hyperparameters.

Its evaluation answers (predicted classes, token NLL sums) are memoised by the exact inputs and
whatever else the answer depends on (a causal LM's labels: which tokens the NLL counts); with
``memo_file`` the memo persists across runs, so a sweep or a series of seeds evaluates the teacher
on the dev and test sets once. The file is keyed by the teacher's weights by whoever names it.
A sharded teacher (``trainer=fsdp``) answers without the memo: ranks that hit it would skip a forward
that the others' all-gathers wait for.

When every training target comes from a store, training never calls the teacher: :meth:`FrozenTeacher.release`
then spills its weights to an unnamed scratch file and frees them, and the first use of ``model`` afterwards
(a validation whose answers the memo lacks, the test, the export) reads them back. The memory a fit needs is
then the student's alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from transformers.utils import ModelOutput

from distill.utils.scratch import written_whole
from distill.utils.sharding import is_sharded, shard

log = logging.getLogger(__name__)


class FrozenTeacher:
    """Wraps the teacher: eval mode, no grad, follows the device of its inputs."""

    def __init__(self, model: nn.Module, memo_file: str | Path | None = None) -> None:
        self._model = model.eval().requires_grad_(False)
        self.memo_file = Path(memo_file) if memo_file else None
        self._memo: dict[str, Tensor] = {}
        if self.memo_file is not None and self.memo_file.is_file():
            self._memo = torch.load(self.memo_file, map_location="cpu")
        self._saved_size = len(self._memo)
        self._spill: IO[bytes] | None = None
        self._devices: dict[str, torch.device] = {}

    @property
    def model(self) -> nn.Module:
        """The teacher, its weights read back first if :meth:`release` freed them."""
        self.read_back()
        return self._model

    @property
    def released(self) -> bool:
        return bool(self._devices)

    def release(self) -> None:
        """Free the weights until ``model`` is next used. The scratch file is written once, beside the memo file
        (in the cache folder; else in the system's temporary folder), and lives as long as this object: unnamed,
        it leaves nothing behind, whatever ends the process. A sharded teacher stays."""
        if self.released or is_sharded(self._model):
            return
        parameters = dict(self._model.named_parameters())  # tied weights once
        if self._spill is None:
            spill_dir = self.memo_file.parent if self.memo_file is not None else None
            if spill_dir is not None:
                spill_dir.mkdir(parents=True, exist_ok=True)
            self._spill = tempfile.TemporaryFile(dir=spill_dir)  # noqa: SIM115 (open while this object lives)
            torch.save({name: value.detach().cpu() for name, value in parameters.items()}, self._spill)
        self._devices = {name: value.device for name, value in parameters.items()}
        for value in parameters.values():
            value.data = torch.empty(0, dtype=value.dtype, device=value.device)
        return_freed_heap()
        log.info("Teacher weights released while every training target comes from the store")

    def read_back(self) -> None:
        """The weights back in memory, where :meth:`release` freed them."""
        if not self.released:
            return
        self._spill.seek(0)
        saved = torch.load(self._spill, map_location="cpu", weights_only=True)
        for name, value in self._model.named_parameters():
            value.data = saved[name].to(self._devices[name])
        self._devices = {}
        log.info("Teacher weights read back")

    @torch.no_grad()
    def __call__(self, inputs: dict[str, Tensor], output_hidden_states: bool = False) -> ModelOutput:
        self._follow(inputs)
        return self.model(**inputs, output_hidden_states=output_hidden_states)

    def shard(self, mesh: DeviceMesh) -> None:
        """Shard the teacher over ``mesh`` (:mod:`distill.utils.sharding`); from now on every rank runs every call."""
        shard(self.model, mesh)

    def _follow(self, inputs: dict[str, Tensor]) -> None:
        device = next(iter(inputs.values())).device
        if next(self.model.parameters()).device != device:
            self.model.to(device)

    @torch.no_grad()
    def last_hidden_state(self, inputs: dict[str, Tensor]) -> Tensor:
        """The base model's final hidden states (after its last norm), without the output head."""
        self._follow(inputs)
        return self.model.base_model(**inputs).last_hidden_state

    def predictions(self, inputs: dict[str, Tensor]) -> Tensor:
        """Predicted classes (see :meth:`memoized`)."""
        return self.memoized(inputs, lambda out: out.logits.argmax(dim=-1), "predictions")

    def memoized(
        self,
        inputs: dict[str, Tensor],
        reduce: Callable[[ModelOutput], Tensor],
        name: str,
        key_tensors: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """``reduce(teacher(inputs))``, memoised by ``name``, the exact inputs and ``key_tensors``, every other
        tensor ``reduce`` reads (labels): a frozen teacher's answer never changes, and every validation check
        sends it the same batches again. Without ``key_tensors`` the key is the one memo files always had."""
        if is_sharded(self._model):
            return reduce(self(inputs))
        key = memo_key(name, inputs, key_tensors or {})
        if key not in self._memo:
            self._memo[key] = reduce(self(inputs)).cpu()
        return self._memo[key].to(next(iter(inputs.values())).device)

    def save_memo(self) -> None:
        """Write the memo to ``memo_file`` (atomically) if it learnt anything since loading."""
        if self.memo_file is None or len(self._memo) == self._saved_size:
            return
        self.memo_file.parent.mkdir(parents=True, exist_ok=True)
        with written_whole(self.memo_file) as scratch:
            torch.save(self._memo, scratch)
        self._saved_size = len(self._memo)


def memo_key(name: str, inputs: dict[str, Tensor], key_tensors: dict[str, Tensor]) -> str:
    digest = hashlib.sha256(name.encode())
    for key, value in sorted(inputs.items()):
        digest.update(tensor_bytes(key, value))
    for key, value in sorted(key_tensors.items()):
        # Marked apart from the inputs, so that a key tensor never hashes like an input of its name.
        digest.update(b"reduce reads " + tensor_bytes(key, value))
    return digest.hexdigest()


def tensor_bytes(name: str, value: Tensor) -> bytes:
    return name.encode() + str(tuple(value.shape)).encode() + value.cpu().numpy().tobytes()


def return_freed_heap() -> None:
    """Hand freed heap pages back to the system: glibc keeps them otherwise, and the process's RSS (what a
    scheduler or an OOM killer reads) would not drop. A no-op where the C library is not glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
