"""Layer-sequential one-shot pruning of a Hugging Face model's stack of blocks (decoder or encoder).

The calibration batches' inputs to the first block are captured (the model runs up to it and is
stopped there); then block by block: the targeted Linear-like layers' input statistics are gathered
from a forward pass of the still-dense block, each layer is pruned by its solver
(:mod:`distill.pruning.oneshot.solvers`), and the pruned block is run again to give the next block its
inputs. Only one block's statistics exist at a time; pruned errors propagate as in SparseGPT and
Wanda. Padding tokens (``attention_mask == 0``) never enter the statistics.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from distill.architectures.linears import block_stack, in_features, linear_names, linear_weight, to_weight_layout
from distill.pruning.oneshot import solvers
from distill.pruning.oneshot.solvers import SparsityTarget

log = logging.getLogger(__name__)
METHODS = ("magnitude", "wanda", "sparsegpt")


def target_linears(model: nn.Module, include: Sequence[str] | None, exclude: Sequence[str] = ()) -> list[str]:
    """Module names of the stack's Linear-like layers matching ``include`` (default: all) and not ``exclude``."""
    stack_name, _ = block_stack(model)
    linears = linear_names(model)
    in_stack = [name for name in linears if name.startswith(f"{stack_name}.")]
    patterns = list(include) if include else [f"{stack_name}.*"]
    for pattern in patterns:
        matched = fnmatch.filter(linears, pattern)
        if not matched:
            raise ValueError(f"include pattern {pattern!r} matches no Linear layer (e.g. {in_stack[:3]})")
        outside = sorted(set(matched) - set(in_stack))
        if outside:
            raise ValueError(f"include pattern {pattern!r} matches {outside[:3]}, outside the blocks {stack_name}.*")
    chosen = [name for name in in_stack if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)]
    chosen = [name for name in chosen if not any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)]
    if not chosen:
        raise ValueError(f"include={patterns} minus exclude={list(exclude)} leaves no Linear layer to prune")
    return chosen


@dataclass
class BlockInputs:
    """One entry per calibration batch: the block's positional and keyword arguments, and real tokens."""

    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    tokens: list[Tensor] = field(default_factory=list)  # bool (batch, length)


class _Stop(Exception):
    """Raised by the hook on the first block: the rest of the forward is not needed."""


@torch.no_grad()
def capture_inputs(model: PreTrainedModel, first_block: nn.Module, batches: Sequence[dict[str, Tensor]]) -> BlockInputs:
    inputs = BlockInputs()

    def stop(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs.args.append(args)
        inputs.kwargs.append(kwargs)
        raise _Stop

    extra = {"use_cache": False} if hasattr(model.config, "use_cache") else {}
    handle = first_block.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for batch in batches:
            with contextlib.suppress(_Stop):
                model(**batch, **extra)
            mask = batch.get("attention_mask")
            inputs.tokens.append(
                mask.bool() if mask is not None else torch.ones_like(batch["input_ids"], dtype=torch.bool)
            )
    finally:
        handle.remove()
    return inputs


def _hidden_of(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class InputStatistics:
    """What a solver needs of one Linear's inputs: ``H = 2/n sum x x^T`` (sparsegpt) or ``sum x_j^2`` (wanda)."""

    def __init__(self, method: str, columns: int, dtype: torch.dtype = torch.float32, device=None) -> None:
        self.method, self.tokens = method, 0
        shape = (columns, columns) if method == "sparsegpt" else (columns,)
        self.value = torch.zeros(shape, dtype=dtype, device=device)

    def add(self, x: Tensor) -> None:
        x = x.to(self.value.dtype)
        if self.method == "wanda":
            self.value += (x**2).sum(dim=0)
        else:  # a running mean, as the reference keeps it: no sum overflows or loses small terms
            total = self.tokens + x.shape[0]
            self.value.mul_(self.tokens / total).addmm_(x.t(), x, alpha=2.0 / total)
        self.tokens += x.shape[0]


def _gather(block: nn.Module, linears: dict[str, nn.Module], inputs: BlockInputs, method: str, dtype) -> dict:
    statistics = {
        name: InputStatistics(method, in_features(linear), dtype, linear.weight.device)
        for name, linear in linears.items()
    }
    current: dict[str, Tensor] = {}

    def hook(name: str) -> Callable:
        def record(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            tokens = current["tokens"]
            rows = x[tokens] if x.shape[:-1] == tokens.shape else x.reshape(-1, x.shape[-1])
            statistics[name].add(rows.reshape(-1, x.shape[-1]))

        return record

    handles = [linear.register_forward_pre_hook(hook(name)) for name, linear in linears.items()]
    try:
        for args, kwargs, tokens in zip(inputs.args, inputs.kwargs, inputs.tokens, strict=True):
            current["tokens"] = tokens
            block(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return statistics


def _advance(block: nn.Module, inputs: BlockInputs) -> BlockInputs:
    """The (pruned) block's outputs, as the next block's inputs."""
    advanced = BlockInputs(tokens=inputs.tokens)
    for args, kwargs in zip(inputs.args, inputs.kwargs, strict=True):
        output = block(*args, **kwargs)
        hidden = output[0] if isinstance(output, tuple) else output
        next_args, next_kwargs = _with_hidden(args, kwargs, hidden)
        advanced.args.append(next_args)
        advanced.kwargs.append(next_kwargs)
    return advanced


@dataclass(frozen=True)
class OneShotSettings:
    method: str
    target: SparsityTarget
    block_size: int = 128
    damp: float = 0.01
    hessian_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} must be one of {METHODS}")
        if not self.damp > 0:
            raise ValueError(f"damp={self.damp!r} must be > 0")
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size!r} must be >= 1")
        if self.method == "sparsegpt":
            solvers.check_block_size(self.block_size, self.target)

    def solve(self, name: str, weight: Tensor, statistics: InputStatistics | None) -> tuple[Tensor, Tensor]:
        if self.method == "magnitude":
            return solvers.magnitude(weight, self.target)
        if self.method == "wanda":
            return solvers.wanda(weight, self.target, statistics.value)
        return solvers.sparsegpt(weight, self.target, statistics.value, self.block_size, self.damp, name)


def check_targets(
    model: nn.Module, settings: OneShotSettings, include: Sequence[str] | None, exclude: Sequence[str] = ()
) -> list[str]:
    """The Linear layers to prune, each wide enough for the N:M pattern; only shapes are read, so the
    check phase runs it on a meta-device model (distill.pipeline.checks) before any weight loads."""
    names = target_linears(model, include, exclude)
    for name in names:
        settings.target.check(linear_weight(model.get_submodule(name)), name)
    return names


@torch.no_grad()
def prune_oneshot(
    model: PreTrainedModel,
    batches: Sequence[dict[str, Tensor]],
    settings: OneShotSettings,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> dict[str, Tensor]:
    """Prune ``model`` in place block by block; returns the masks, ``{"<linear>.weight": keep}``."""
    names = check_targets(model, settings, include, exclude)
    stack_name, stack = block_stack(model)
    was_training = model.training
    model.eval()
    inputs = capture_inputs(model, stack[0], batches) if settings.method != "magnitude" else None
    masks: dict[str, Tensor] = {}
    per_block = [[name for name in names if name.startswith(f"{stack_name}.{index}.")] for index in range(len(stack))]
    last = max(index for index, block_names in enumerate(per_block) if block_names)
    for index, block in enumerate(stack[: last + 1]):
        linears = {name: model.get_submodule(name) for name in per_block[index]}
        statistics = _gather(block, linears, inputs, settings.method, settings.hessian_dtype) if inputs else {}
        started = time.perf_counter()
        for name, linear in linears.items():
            # Solvers work on [out, in]; the view writes the result into the parameter whatever its layout,
            # and the mask is saved in the parameter's layout, as the masking callbacks apply it.
            weight, keep = settings.solve(name, linear_weight(linear), statistics.get(name))
            linear_weight(linear).copy_(weight)
            masks[f"{name}.weight"] = to_weight_layout(linear, keep).contiguous().cpu()
        if linears:
            log.info("block %d: %d layers pruned in %.1f s", index, len(linears), time.perf_counter() - started)
        if inputs is not None and index < last:  # the blocks after the last pruned one need no inputs
            inputs = _advance(block, inputs)
    model.train(was_training)
    return masks
