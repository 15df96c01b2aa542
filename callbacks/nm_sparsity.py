"""N:M structured sparsity (2:4 by default) as a Lightning callback, the APEX ASP recipe.

Optional dense steps, then masks computed once at ``prune_step`` and held while training goes on
(ASP's "prune a trained model, then fine-tune"). Two backends compute the mask:

* ``native``: :func:`distill.kernels.nm_mask`, equal to ASP's ``m4n2_1d`` on any device/dtype.
* ``apex``: ``apex.contrib.sparsity.ASP`` itself, when it imports and CUDA is present (``auto``
  picks it then). Permutation stays off. Gradients are still masked here, because ASP's
  pre-step hook sees stale gradients under Lightning's closure-based ``optimizer.step``.
  ASP reads every weight as ``[out, in]``, so it would group a transposed ``Conv1D`` weight (GPT-2)
  along its outputs: with such a layer among the targets ``auto`` picks ``native`` and ``apex`` is an error.

Groups run along the input dimension of each layer's ``[out, in]`` view (``linear_weight``); masks are
stored and applied in the parameter's own layout, like every masking callback's.

Either way the masks live in this callback's checkpoint state; ASP's ``__weight_mma_mask``
buffers found in a checkpoint are read too (see ``DistillationModule.on_load_checkpoint``),
so a checkpoint written with one backend resumes with the other.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from distill.architectures.linears import is_transposed, linear_weight, to_weight_layout
from distill.callbacks.masking import MaskingCallback
from distill.kernels.sparsity import check_nm, nm_mask
from distill.modules.student_checkpoint import ASP_MASK_KEY

log = logging.getLogger(__name__)


def load_asp():
    """APEX's ``ASP`` class, or ``None`` when apex (an optional, source-built dependency) is absent."""
    try:
        return importlib.import_module("apex.contrib.sparsity").ASP
    except ImportError:
        return None


def cuda_available() -> bool:
    return torch.cuda.is_available()


def nm_eligible(weight: Tensor, m: int) -> bool:
    """ASP's shape rule (out % 8, in % 16) on an ``[out, in]`` weight, applied to every dtype, plus whole
    groups of ``m``."""
    return weight.dim() == 2 and weight.shape[0] % 8 == 0 and weight.shape[1] % 16 == 0 and weight.shape[1] % m == 0


def _layer(pl_module: nn.Module, weight_name: str) -> nn.Module:
    return pl_module.get_submodule(weight_name.removesuffix(".weight"))


class NMSparsity(MaskingCallback):
    """Hold ``n`` of every ``m`` consecutive input-channel weights from ``prune_step`` on."""

    def __init__(
        self,
        n: int = 2,
        m: int = 4,
        prune_step: int = 0,
        backend: str = "auto",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        zero_optimizer_state: bool = True,
        allow_overlap: bool = False,
    ) -> None:
        super().__init__(include, exclude, zero_optimizer_state, allow_overlap)
        check_nm(n, m)
        if prune_step < 0:
            raise ValueError(f"prune_step={prune_step!r} must be >= 0")
        if backend not in ("auto", "native", "apex"):
            raise ValueError(f"backend={backend!r} must be 'auto', 'native' or 'apex'")
        self.n, self.m, self.prune_step = n, m, prune_step
        self.requested_backend = backend
        self.backend = "native"
        self._asp = None

    def select_targets(self, pl_module: pl.LightningModule, names: list[str]) -> list[str]:
        eligible = [name for name in names if nm_eligible(linear_weight(_layer(pl_module, name)), self.m)]
        skipped = sorted(set(names) - set(eligible))
        explicit = [name for name in skipped if name.removesuffix(".weight") in (self.include or ())]
        if explicit:
            shapes = {name: tuple(linear_weight(_layer(pl_module, name)).shape) for name in explicit}
            raise ValueError(f"layers named for {self.n}:{self.m} sparsity have ineligible shapes: {shapes}")
        if skipped:
            log.warning(
                "%d:%d sparsity skips %d layer(s) with ineligible shapes: %s", self.n, self.m, len(skipped), skipped
            )
        return eligible

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        transposed = [name for name in self.targets if is_transposed(_layer(pl_module, name))]
        self.backend = self._pick_backend(transposed)

    def _pick_backend(self, transposed: list[str]) -> str:
        """``transposed``: targets whose weight is stored ``[in, out]`` (Conv1D), which ASP would group wrongly."""
        asp_usable = load_asp() is not None and cuda_available()
        if self.requested_backend == "apex" and not asp_usable:
            raise RuntimeError("backend='apex' needs apex.contrib.sparsity importable and CUDA; use backend='native'")
        if self.requested_backend == "apex" and transposed:
            raise ValueError(
                f"backend='apex' cannot mask {transposed[:3]}: their weights are stored [in, out] (Conv1D) and "
                "ASP groups along the stored rows; use backend='native'"
            )
        if self.requested_backend == "auto" and asp_usable and transposed:
            log.info("%d:%d masks: native, not apex (%d Conv1D targets)", self.n, self.m, len(transposed))
            return "native"
        if self.requested_backend == "apex" or (self.requested_backend == "auto" and asp_usable):
            if (self.n, self.m) != (2, 4):
                raise ValueError(f"the apex backend only does 2:4, not {self.n}:{self.m}; use backend='native'")
            return "apex"
        return "native"

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if not self.masks:  # a checkpoint without our state, written by ASP itself
            self.masks = {name: mask for name, mask in checkpoint.get(ASP_MASK_KEY, {}).items() if name in self.targets}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.backend == "apex":
            self._init_asp(trainer, pl_module)

    def complete(self, global_step: int) -> bool:
        """Whether the N:M masks are in place: set at ``prune_step`` and trained through."""
        return global_step > self.prune_step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        if self.masks or trainer.global_step < self.prune_step:
            return
        masks = self._asp_masks(pl_module) if self._asp is not None else self._native_masks(pl_module)
        self.set_masks(trainer, pl_module, masks)
        log.info("%d:%d masks set on %d layers at step %d", self.n, self.m, len(masks), trainer.global_step)

    @torch.no_grad()
    def _native_masks(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        return {name: self.layer_mask(_layer(pl_module, name)) for name in self.targets}

    def layer_mask(self, layer: nn.Module) -> Tensor:
        """The layer's N:M mask, grouped along its input dimension, in the layout of its weight parameter."""
        return to_weight_layout(layer, nm_mask(linear_weight(layer), self.n, self.m)).contiguous()

    # -- APEX ASP ---------------------------------------------------------------------------
    def _init_asp(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise RuntimeError(f"the apex backend needs exactly one optimizer, found {len(trainer.optimizers)}")
        asp = load_asp()
        layers = [name.removesuffix(".weight") for name in self.targets]
        layer_types = {type(pl_module.get_submodule(layer)) for layer in layers} - {nn.Linear}
        asp.init_model_for_pruning(
            pl_module,
            mask_calculator="m4n2_1d",
            verbosity=1,
            whitelist=[nn.Linear],
            allowed_layer_names=layers,
            allow_recompute_mask=False,
            custom_layer_dict={layer_type: ["weight"] for layer_type in layer_types},  # e.g. QAT's FakeQuantizedLinear
            allow_permutation=False,
        )
        asp.init_optimizer_for_pruning(trainer.optimizers[0])
        self._asp = asp
        with torch.no_grad():
            for name, mask in self.masks.items():  # resumed masks go into ASP's own buffers
                self._asp_buffer(pl_module, name).copy_(mask)

    @staticmethod
    def _asp_buffer(pl_module: pl.LightningModule, name: str) -> Tensor:
        layer, param = name.rsplit(".", 1)
        return pl_module.get_submodule(layer).get_buffer(f"__{param}_mma_mask")

    def _asp_masks(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        self._asp.compute_sparse_masks()
        return {name: self._asp_buffer(pl_module, name).clone().bool() for name in self.targets}

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._asp is None:
            return
        # ASP is process-global and keeps raw tensor references: drop them and its buffers so a
        # later fit (or test loading a checkpoint) starts from a plain model.
        for attr in ("model", "optimizer", "calculate_mask"):
            setattr(self._asp, f"_ASP__{attr}", None)
        self._asp._ASP__sparse_parameters = []
        for name in self.targets:
            layer, param = name.rsplit(".", 1)
            pl_module.get_submodule(layer)._buffers.pop(f"__{param}_mma_mask", None)
        self._asp = None

    def describe(self) -> dict[str, Any]:
        """For the export manifest."""
        return {"pattern": f"{self.n}:{self.m}", "layers": sorted(self.masks), "backend": self.backend}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "n": self.n, "m": self.m}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if (state_dict["n"], state_dict["m"]) != (self.n, self.m):
            raise ValueError(
                f"checkpoint holds {state_dict['n']}:{state_dict['m']} masks, this run asks {self.n}:{self.m}"
            )
        super().load_state_dict(state_dict)
