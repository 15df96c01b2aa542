"""What the sparsity callbacks share: target selection and in-place mask enforcement.

Masks are owned by the callback (a dict ``parameter name -> bool tensor``), never registered on
the model, so checkpoints stay plain dense state dicts whose pruned entries are exact zeros and
the student loads anywhere without the callback. Parameters are looked up by name at every use,
because QAT swaps modules and device moves replace tensors.

Enforcement follows APEX ASP, done with Lightning hooks instead of a patched ``optimizer.step``:
gradients are masked in ``on_before_optimizer_step`` (after AMP unscaling, before clipping) and
weights re-masked in ``on_train_batch_end`` (after the step, before ``ModelCheckpoint`` saves).
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from distill.architectures.linears import block_stack, linear_names
from distill.callbacks.compression import CompressionCallback

log = logging.getLogger(__name__)

# The LightningModule's attribute holding the student: default targets are found inside it, not in the teacher.
STUDENT = "student"
# Optimizer state kept per element (Adam's moments, SGD's momentum) is zeroed where weights are pruned.
_ELEMENTWISE_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def default_include(module: nn.Module) -> list[str]:
    """The glob naming every layer of the student's block stack (its decoder or encoder layers), whatever
    the family calls them: the heads, embeddings and classifier stay out."""
    if not isinstance(getattr(module, STUDENT, None), nn.Module):
        raise ValueError(f"{type(module).__name__} has no {STUDENT!r} module to find default targets in: give include")
    stack_name, _ = block_stack(module.get_submodule(STUDENT))
    return [f"{STUDENT}.{stack_name}.*"]


def resolve_targets(module: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> list[str]:
    """Names of the ``weight`` of every Linear-like layer whose module name matches ``include`` and not ``exclude``.

    Patterns are shell-style globs over names in ``module.named_modules()`` (``*`` crosses dots);
    a pattern that matches no Linear-like layer is an error naming it. ``include=None``: the layers
    of the student's block stack (:func:`default_include`).
    """
    linears = linear_names(module)
    include = default_include(module) if include is None else list(include)
    for pattern in include:
        if not fnmatch.filter(linears, pattern):
            raise ValueError(f"target pattern {pattern!r} matches no Linear layer (e.g. {linears[:3]})")
    chosen = [name for name in linears if any(fnmatch.fnmatchcase(name, pattern) for pattern in include)]
    chosen = [name for name in chosen if not any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)]
    if not chosen:
        raise ValueError(f"include={include} minus exclude={list(exclude)} leaves no layer to compress")
    return [f"{name}.weight" for name in chosen]


def check_masks_fit(module: nn.Module, masks: dict[str, Tensor], source: str) -> None:
    """Every mask names a parameter of ``module`` of the mask's shape; else an error naming ``source``."""
    for name, mask in masks.items():
        try:
            shape = tuple(module.get_parameter(name).shape)
        except AttributeError:
            raise ValueError(f"{source} has a mask for {name}, which this model does not have") from None
        if tuple(mask.shape) != shape:
            raise ValueError(f"{source}: the mask for {name} has shape {tuple(mask.shape)}, the model's is {shape}")


class MaskingCallback(CompressionCallback):
    """Holds ``masks`` for named parameters and keeps the weights, gradients and optimizer state masked."""

    def __init__(
        self,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        zero_optimizer_state: bool = True,
        allow_overlap: bool = False,
    ) -> None:
        # include=None: the Linear-like layers of the student's block stack, found at setup.
        self.include = None if include is None else list(include)
        self.exclude = list(exclude)
        self.zero_optimizer_state = zero_optimizer_state
        self.allow_overlap = allow_overlap
        self.targets: list[str] = []
        self.masks: dict[str, Tensor] = {}

    # -- selection --------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.targets = self.select_targets(pl_module, resolve_targets(pl_module, self.include, self.exclude))
        for other in trainer.callbacks:
            if other is self or not isinstance(other, MaskingCallback) or not other.targets:
                continue
            shared = sorted(set(self.targets) & set(other.targets))
            if shared and not (self.allow_overlap and other.allow_overlap):
                raise ValueError(
                    f"{type(self).__name__} and {type(other).__name__} both target {shared[:3]}"
                    f"{' ...' if len(shared) > 3 else ''}; set allow_overlap: true on both to combine them"
                )

    def select_targets(self, pl_module: pl.LightningModule, names: list[str]) -> list[str]:
        """Subclasses drop ineligible layers here."""
        return names

    # -- enforcement ------------------------------------------------------------------------
    @torch.no_grad()
    def apply_masks(self, pl_module: pl.LightningModule) -> None:
        for name, mask in self.masks.items():
            param = pl_module.get_parameter(name)
            if mask.device != param.device:
                self.masks[name] = mask = mask.to(param.device)
            param.mul_(mask)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        for name, mask in self.masks.items():
            grad = pl_module.get_parameter(name).grad
            if grad is not None:
                grad.mul_(mask.to(grad.device))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.apply_masks(pl_module)

    def set_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, masks: dict[str, Tensor]) -> None:
        """Install new masks identically on every rank, then mask weights and optimizer state."""
        masks = trainer.strategy.broadcast({name: mask.cpu() for name, mask in masks.items()}, src=0)
        self.masks = {name: mask.to(pl_module.get_parameter(name).device) for name, mask in masks.items()}
        self.apply_masks(pl_module)
        if self.zero_optimizer_state:
            for optimizer in trainer.optimizers:
                self._zero_pruned_state(pl_module, optimizer)

    @torch.no_grad()
    def _zero_pruned_state(self, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        for name, mask in self.masks.items():
            state = optimizer.state.get(pl_module.get_parameter(name), {})
            for key in _ELEMENTWISE_STATE:
                value = state.get(key)
                if isinstance(value, Tensor) and value.shape == mask.shape:
                    value.mul_(mask.to(value.device))

    # -- checkpoints ------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Restored masks (resume) or masks from an earlier fit: check them and put them back in force.
        check_masks_fit(pl_module, self.masks, "checkpoint")
        self.apply_masks(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"masks": {name: mask.cpu() for name, mask in self.masks.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.masks = dict(state_dict.get("masks", {}))
