"""Calibration importance scores for structured pruning of causal LMs of any family.

Contract: :func:`calibration_scores` runs a ``*ForCausalLM`` on calibration batches (dicts with
``input_ids`` and optionally ``attention_mask``) in eval mode under ``torch.no_grad`` and returns
:class:`ImportanceScores`, all measured with forward hooks and averaged over real (unpadded) tokens.
Higher always means more important. Depth scores need only the decoder-layer list; width scores read
the family's :class:`~distill.architectures.layouts.Layout` (which projection maps heads and FFN
channels back to the hidden width, which norms run on it).

- Depth: Block Influence (ShortGPT), ``1 - cos(h_in, h_out)`` of each decoder layer, and, unless
  ``measure_nll=False``, the increase of the mean next-token NLL when that single layer is replaced
  by the identity. :meth:`ImportanceScores.depth` ranks by the NLL increase when it was measured
  (it is what a layer costs the loss when skipped), else by Block Influence.
- Width (Minitron, activation-based; only with ``measure_width``): FFN channel = mean ``|x|`` of the
  MLP output projection's input (``act(gate(x)) * up(x)`` in gated MLPs); attention head = mean L2
  norm of the head's slice of the attention output projection's input; hidden channel = mean ``|x|``
  of the output of every hidden-width norm (those of each layer and the final norm), averaged.

The model's training mode is restored afterwards; its weights are never changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel

from distill.architectures.layouts import Sizes, layout_of
from distill.architectures.linears import block_stack

LAYER_SCORES = ("auto", "nll", "block_influence", "bi")  # "bi" is short for "block_influence"


@dataclass
class ImportanceScores:
    """Per-layer and per-channel importance measured on calibration data (higher = keep)."""

    block_influence: Tensor  # [layers]
    nll_increase: Tensor | None  # [layers]; None when not measured
    baseline_nll: float  # mean next-token NLL of the unpruned model
    ffn: Tensor | None  # [layers, intermediate_size]; None when width was not measured
    heads: Tensor | None  # [layers, num_attention_heads]
    hidden: Tensor | None  # [hidden_size]

    def depth(self, kind: str = "auto") -> Tensor:
        """Per-layer scores: ``nll`` (NLL rise when skipped), ``block_influence``/``bi``, ``auto`` (nll if measured)."""
        if kind not in LAYER_SCORES:
            raise ValueError(f"layer_score={kind!r} must be one of {LAYER_SCORES}")
        if kind in ("block_influence", "bi") or (kind == "auto" and self.nll_increase is None):
            return self.block_influence
        if self.nll_increase is None:
            raise ValueError("layer_score='nll' needs scores measured with measure_nll=True")
        return self.nll_increase

    def kv_groups(self, num_key_value_heads: int) -> Tensor:
        """[layers, num_key_value_heads]: the sum over the query heads that share each KV head."""
        layers, heads = self.heads.shape
        return self.heads.reshape(layers, num_key_value_heads, heads // num_key_value_heads).sum(-1)


class _TokenMeans:
    """Sums of per-token values over the real tokens of all batches seen, keyed by name."""

    def __init__(self) -> None:
        self.sums: dict[Any, Tensor] = {}
        self.tokens = 0
        self.mask: Tensor | None = None

    def start_batch(self, mask: Tensor) -> None:
        self.mask = mask
        self.tokens += int(mask.sum())

    def add(self, key: Any, values: Tensor) -> None:
        """``values`` is [batch, tokens, ...] or [batch * tokens, ...] (OPT flattens inside its layers);
        padded positions are dropped."""
        if values.shape[: self.mask.dim()] != self.mask.shape:
            values = values.reshape(*self.mask.shape, *values.shape[1:])
        total = values[self.mask].float().sum(0)
        self.sums[key] = self.sums[key] + total if key in self.sums else total

    def mean(self, key: Any) -> Tensor:
        return (self.sums[key] / self.tokens).cpu()

    # Hook factories: each records one per-token quantity under ``key``.
    def block_influence(self, key: Any) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor | tuple) -> None:
            cosine = F.cosine_similarity(_layer_input(args, kwargs).float(), _layer_output(output).float(), dim=-1)
            self.add(key, 1 - cosine)

        return hook

    def head_norms(self, key: Any, head_dim: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            per_head = args[0].reshape(*args[0].shape[:-1], -1, head_dim)
            self.add(key, per_head.float().norm(dim=-1))

        return hook

    def input_magnitude(self, key: Any) -> Callable:
        return lambda module, args: self.add(key, args[0].abs())

    def output_magnitude(self, key: Any) -> Callable:
        return lambda module, args, output: self.add(key, output.abs())


def _layer_input(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _layer_output(output: Tensor | tuple) -> Tensor:
    # Older transformers return (hidden_states, ...) from decoder layers, newer the tensor itself.
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def _hooks(handles: list[RemovableHandle]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _influence_hooks(layers: nn.ModuleList, means: _TokenMeans) -> list[RemovableHandle]:
    return [
        layer.register_forward_hook(means.block_influence(("block_influence", index)), with_kwargs=True)
        for index, layer in enumerate(layers)
    ]


def _width_hooks(model: PreTrainedModel, means: _TokenMeans) -> list[RemovableHandle]:
    layout, head_dim = layout_of(model), Sizes.of(model.config).head_dim
    final_norm = model.get_submodule(layout.final_norm)
    handles = [final_norm.register_forward_hook(means.output_magnitude(("hidden", "final")))]
    attention_out, mlp_out = layout.projection("query").path, layout.projection("ffn").path
    for index, layer in enumerate(block_stack(model)[1]):
        handles += [
            layer.get_submodule(attention_out).register_forward_pre_hook(means.head_norms(("heads", index), head_dim)),
            layer.get_submodule(mlp_out).register_forward_pre_hook(means.input_magnitude(("ffn", index))),
        ]
        for norm in layout.hidden_norms:
            hook = means.output_magnitude(("hidden", index, norm))
            handles.append(layer.get_submodule(norm).register_forward_hook(hook))
    return handles


def _mean_nll(model: PreTrainedModel, batches: list[dict[str, Tensor]], means: _TokenMeans | None = None) -> float:
    """Mean next-token NLL over real tokens whose successor is real too."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches:
        input_ids = batch["input_ids"].to(device)
        mask = batch.get("attention_mask", torch.ones_like(input_ids)).to(device).bool()
        if means is not None:
            means.start_batch(mask)
        logits = model(input_ids=input_ids, attention_mask=mask.long(), use_cache=False).logits[:, :-1]
        scored = mask[:, 1:] & mask[:, :-1]
        total += F.cross_entropy(logits[scored].float(), input_ids[:, 1:][scored], reduction="sum").item()
        count += int(scored.sum())
    if count == 0:
        raise ValueError("calibration batches hold no pair of consecutive real tokens to score")
    return total / count


def _skip_as_identity(module: nn.Module, args: tuple, kwargs: dict, output: Tensor | tuple) -> Tensor | tuple:
    hidden = _layer_input(args, kwargs)
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _nll_increase(model: PreTrainedModel, batches: list[dict[str, Tensor]], baseline: float) -> Tensor:
    increases = []
    for layer in block_stack(model)[1]:
        with _hooks([layer.register_forward_hook(_skip_as_identity, with_kwargs=True)]):
            increases.append(_mean_nll(model, batches) - baseline)
    return torch.tensor(increases)


def _collect(means: _TokenMeans, depth: int, width: bool) -> dict[str, Tensor | None]:
    per_layer = {
        kind: torch.stack([means.mean((kind, index)) for index in range(depth)])
        if width or kind == "block_influence"
        else None
        for kind in ("block_influence", "ffn", "heads")
    }
    hidden_keys = [key for key in means.sums if key[0] == "hidden"]
    return {**per_layer, "hidden": torch.stack([means.mean(key) for key in hidden_keys]).mean(0) if width else None}


@torch.no_grad()
def calibration_scores(
    model: PreTrainedModel,
    batches: Iterable[dict[str, Tensor]],
    *,
    measure_nll: bool = True,
    measure_width: bool = True,
) -> ImportanceScores:
    """Measure depth and width importance on ``batches`` (see the module docstring)."""
    batches = list(batches)
    if not batches:
        raise ValueError("calibration batches are empty: pruning needs data to score layers and channels")
    was_training = model.training
    model.eval()
    try:
        means, layers = _TokenMeans(), block_stack(model)[1]
        handles = _influence_hooks(layers, means) + (_width_hooks(model, means) if measure_width else [])
        with _hooks(handles):
            baseline = _mean_nll(model, batches, means)
        nll_increase = _nll_increase(model, batches, baseline) if measure_nll else None
    finally:
        model.train(was_training)
    collected = _collect(means, len(block_stack(model)[1]), measure_width)
    return ImportanceScores(nll_increase=nll_increase, baseline_nll=baseline, **collected)
