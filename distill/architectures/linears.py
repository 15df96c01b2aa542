"""Linear-like layers and the block stack: the one place that knows how families lay them out.

A layer is Linear-like when it computes ``x @ W^T + b`` with one weight matrix: ``nn.Linear`` and its
subclasses (QAT's fake-quantized containers among them) store ``W`` as ``[out, in]``; GPT-2's
``transformers.pytorch_utils.Conv1D`` (and its subclasses) stores it transposed, ``[in, out]``.
Every compression method reasons on ``[out, in]`` (N:M groups run along the input dimension, QAT
scales per output channel), so it reads weights through :func:`linear_weight`, a view whose in-place
updates reach the parameter, and turns ``[out, in]`` results (masks) back into the parameter's own
layout with :func:`to_weight_layout`.
"""

from __future__ import annotations

from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a Linear-like layer (``nn.Linear``, ``Conv1D`` or a subclass of either)."""
    return isinstance(module, (nn.Linear, Conv1D))


def is_transposed(module: nn.Module) -> bool:
    """Whether the layer stores its weight as ``[in, out]`` (``Conv1D``) rather than ``[out, in]``."""
    return isinstance(module, Conv1D)


def _check_linear(module: nn.Module) -> None:
    if not is_linear(module):
        raise TypeError(f"{type(module).__name__} is not a Linear-like layer (nn.Linear or Conv1D)")


def linear_weight(module: nn.Module) -> Tensor:
    """The layer's weight as ``[out, in]``: the parameter itself, or a transposed view of it (``Conv1D``),
    so ``copy_``/``mul_`` on the result write the parameter."""
    _check_linear(module)
    return module.weight.T if is_transposed(module) else module.weight


def to_weight_layout(module: nn.Module, matrix: Tensor) -> Tensor:
    """An ``[out, in]`` tensor (a mask, a new weight) in the layout of ``module``'s weight parameter."""
    _check_linear(module)
    return matrix.T if is_transposed(module) else matrix


def in_features(module: nn.Module) -> int:
    return linear_weight(module).shape[1]


def out_features(module: nn.Module) -> int:
    return linear_weight(module).shape[0]


def linear_names(model: nn.Module) -> list[str]:
    """Module names of every Linear-like layer of ``model``, in ``named_modules`` order."""
    return [name for name, module in model.named_modules() if is_linear(module)]


def block_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's repeated blocks (decoder or encoder layers): the ModuleList holding the most parameters."""
    lists = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no ModuleList of blocks (decoder or encoder layers)")
    return max(lists, key=lambda item: sum(param.numel() for param in item[1].parameters()))


def block_linear_names(model: nn.Module) -> list[str]:
    """Module names of the Linear-like layers inside ``model``'s block stack (not the embeddings or heads)."""
    stack_name, _ = block_stack(model)
    return [name for name in linear_names(model) if name.startswith(f"{stack_name}.")]
