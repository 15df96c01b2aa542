"""Structured pruning of a Llama-family causal LM into a smaller dense student (Minitron / Sheared-LLaMA).

Contract:

- :func:`choose_shape` turns either an explicit (partial) shape or a total parameter target into a
  :class:`PrunedShape`. Parameters are counted by building the student on the meta device, so they
  equal ``model.num_parameters()`` exactly (tied embeddings once, biases of any Llama-layout family).
- :func:`prune` returns a NEW model of the teacher's class (the teacher is deep-copied, never changed)
  that keeps, by the :class:`~distill.models.pruning_scores.ImportanceScores`, the top layers (in their
  original order), per kept layer the top FFN channels and whole KV groups with their query heads, and
  the top hidden channels, sliced out of the embeddings, every norm, every projection and ``lm_head``
  (tied embeddings stay tied). ``head_dim`` is kept and written to ``config.head_dim``. The result
  round-trips through ``save_pretrained`` / ``AutoModelForCausalLM.from_pretrained``.
- :func:`pruned_student` measures, chooses, prunes and optionally writes a JSON report.

Shape for a parameter target: the listed axes (``depth``, ``ffn``, ``hidden``, ``heads``; ``width``
means ``ffn`` + ``hidden``, the axes Llama-3.1-Minitron-4B-Width shrank while keeping its attention
heads) all shrink by one common factor, the largest that fits, found by bisection: layers round down
(at least 1), ``intermediate_size`` to a multiple of 64, ``hidden_size`` to a multiple of ``head_dim``,
KV groups down (at least 1) with their query heads. The gap the rounding leaves is then filled
greedily, coarse steps first (one layer, one ``head_dim`` of hidden, one KV group, 64 FFN channels),
so no listed axis can grow by one step without passing ``target_params``.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from distill.models.pruning_scores import LAYER_SCORES, ImportanceScores, calibration_scores, decoder_layers

AXES = ("depth", "ffn", "hidden", "heads")
AXIS_ALIASES = {"width": ("ffn", "hidden")}
FFN_MULTIPLE = 64
# The hidden width moves in steps that are multiples of 8 and of the head count: transformers
# refuses to build (or save) a config whose hidden size the head count does not divide, even with
# an explicit head_dim (SmolLM2's 9 heads: steps of 72).
HIDDEN_MULTIPLE = 8
BISECTION_STEPS = 30


@dataclass(frozen=True)
class PrunedShape:
    """The student's sizes; ``head_dim`` is always the teacher's."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int

    @classmethod
    def of(cls, config: PretrainedConfig) -> PrunedShape:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(config.num_hidden_layers, config.hidden_size, config.intermediate_size, heads, kv_heads)

    @property
    def queries_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


@dataclass(frozen=True)
class KeptIndices:
    """What the student keeps, as sorted indices into the teacher's layers and channels."""

    layers: list[int]
    ffn: list[Tensor]  # per kept layer: intermediate channels
    kv_groups: list[Tensor]  # per kept layer: KV heads (each with its query heads)
    hidden: Tensor


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def decoder_layer_params(model: PreTrainedModel) -> int:
    """Parameters inside the decoder layers (embeddings, final norm and ``lm_head`` excluded)."""
    return sum(param.numel() for param in decoder_layers(model).parameters())


def _apply_shape(config: PretrainedConfig, shape: PrunedShape, kept_layers: Sequence[int], head_dim: int) -> None:
    updates = {
        "num_hidden_layers": shape.num_layers,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        # hidden_size / num_attention_heads no longer gives the head size once either is pruned.
        "head_dim": head_dim,
    }
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        updates["layer_types"] = [layer_types[index] for index in kept_layers]
    config.update(updates)


def shape_params(config: PretrainedConfig, shape: PrunedShape) -> int:
    """Exact parameter count of ``config``'s causal-LM class at ``shape`` (built on the meta device)."""
    student_config = copy.deepcopy(config)
    _apply_shape(student_config, shape, range(shape.num_layers), head_dim_of(config))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(student_config).num_parameters()


def _param_counter(config: PretrainedConfig) -> Callable[[PrunedShape], int]:
    """shape -> parameters, from two meta builds per width (the count is linear in the depth)."""
    cache: dict[PrunedShape, tuple[int, int]] = {}

    def count(shape: PrunedShape) -> int:
        one_layer = replace(shape, num_layers=1)
        if one_layer not in cache:
            single, double = shape_params(config, one_layer), shape_params(config, replace(shape, num_layers=2))
            cache[one_layer] = (single - (double - single), double - single)
        outside_layers, per_layer = cache[one_layer]
        return outside_layers + shape.num_layers * per_layer

    return count


def _validated(shape: PrunedShape, teacher: PrunedShape, given: Iterable[str] = ()) -> PrunedShape:
    """``shape`` if it fits in the teacher; fields the user ``given`` are checked first, so errors name them."""
    given = list(given)
    for name in [*given, *(field.name for field in fields(PrunedShape) if field.name not in given)]:
        value, limit = getattr(shape, name), getattr(teacher, name)
        if not isinstance(value, int) or not 1 <= value <= limit:
            raise ValueError(f"student.shape.{name}={value!r} must be an integer in [1, {limit}] (the teacher's)")
    if shape.num_attention_heads != shape.num_key_value_heads * teacher.queries_per_group:
        raise ValueError(
            f"student.shape.num_attention_heads={shape.num_attention_heads} must be {teacher.queries_per_group} x "
            f"num_key_value_heads={shape.num_key_value_heads}: whole KV groups are kept with their query heads"
        )
    if shape.hidden_size % shape.num_attention_heads:
        raise ValueError(
            f"student.shape.hidden_size={shape.hidden_size} must be a multiple of num_attention_heads="
            f"{shape.num_attention_heads}: transformers refuses to build or save such a config"
        )
    return shape


def hidden_step(heads: int) -> int:
    """The granularity of the hidden width for a student with ``heads`` attention heads."""
    return math.lcm(HIDDEN_MULTIPLE, heads)


def _divides(shape: PrunedShape) -> bool:
    return shape.hidden_size % shape.num_attention_heads == 0


def _explicit_shape(teacher: PrunedShape, shape: Mapping[str, int]) -> PrunedShape:
    """Unset fields keep the teacher's, except that one head count given alone sets the other by the ratio."""
    sizes = dict(shape)
    unknown = sorted(set(sizes) - {field.name for field in fields(PrunedShape)})
    if unknown:
        raise ValueError(f"student.shape has unknown fields {unknown}; known: {[f.name for f in fields(PrunedShape)]}")
    ratio = teacher.queries_per_group
    if "num_key_value_heads" in sizes and "num_attention_heads" not in sizes:
        sizes["num_attention_heads"] = sizes["num_key_value_heads"] * ratio
    if "num_attention_heads" in sizes and "num_key_value_heads" not in sizes:
        sizes["num_key_value_heads"] = max(1, sizes["num_attention_heads"] // ratio)
    return _validated(replace(teacher, **sizes), teacher, given=shape.keys())


def _round_down(value: float, multiple: int, limit: int) -> int:
    if value >= limit:
        return limit
    return min(limit, max(multiple, math.floor(value / multiple) * multiple))


@dataclass(frozen=True)
class _ShapeSearch:
    """Shapes reachable from the teacher along ``axes``, and their parameter counts."""

    teacher: PrunedShape
    axes: frozenset[str]
    count: Callable[[PrunedShape], int]

    def scaled(self, scale: float) -> PrunedShape:
        """Every listed axis at ``scale`` of the teacher's size, rounded down to its granularity."""
        teacher, sizes = self.teacher, {}
        if "depth" in self.axes:
            sizes["num_layers"] = max(1, math.floor(teacher.num_layers * scale))
        if "ffn" in self.axes:
            ffn = teacher.intermediate_size
            sizes["intermediate_size"] = _round_down(ffn * scale, FFN_MULTIPLE, ffn)
        if "heads" in self.axes:
            groups = max(1, math.floor(teacher.num_key_value_heads * scale))
            sizes.update(num_key_value_heads=groups, num_attention_heads=groups * teacher.queries_per_group)
        if "hidden" in self.axes:
            step = hidden_step(sizes.get("num_attention_heads", teacher.num_attention_heads))
            sizes["hidden_size"] = _round_down(teacher.hidden_size * scale, step, teacher.hidden_size)
        return replace(teacher, **sizes)

    def grown(self, shape: PrunedShape, axis: str) -> PrunedShape:
        """``shape`` one step larger along ``axis``, capped at the teacher's size."""
        teacher = self.teacher
        if axis == "depth":
            return replace(shape, num_layers=min(teacher.num_layers, shape.num_layers + 1))
        if axis == "hidden":
            step = hidden_step(shape.num_attention_heads)
            return replace(shape, hidden_size=min(teacher.hidden_size, shape.hidden_size + step))
        if axis == "heads":
            groups = min(teacher.num_key_value_heads, shape.num_key_value_heads + 1)
            return replace(shape, num_key_value_heads=groups, num_attention_heads=groups * teacher.queries_per_group)
        return replace(shape, intermediate_size=min(teacher.intermediate_size, shape.intermediate_size + FFN_MULTIPLE))

    def largest_within(self, target: float) -> PrunedShape:
        """Bisect the common scale, then fill the rounding gap greedily, coarse steps first."""
        low, high = 0.0, 1.0
        for _ in range(BISECTION_STEPS):
            middle = (low + high) / 2
            low, high = (middle, high) if self.fits(self.scaled(middle), target) else (low, middle)
        shape = self.scaled(low)
        for axis in ("depth", "hidden", "heads", "ffn"):
            while axis in self.axes and (bigger := self.grown(shape, axis)) != shape and self.fits(bigger, target):
                shape = bigger
        return shape

    def fits(self, shape: PrunedShape, target: float) -> bool:
        return _divides(shape) and self.count(shape) <= target


def _expand_axes(axes: Iterable[str]) -> frozenset[str]:
    expanded = frozenset(name for axis in axes for name in AXIS_ALIASES.get(axis, (axis,)))
    unknown = sorted(expanded - set(AXES))
    if unknown or not expanded:
        raise ValueError(f"student.axes={list(axes)!r} must be a non-empty subset of {[*AXES, *AXIS_ALIASES]}")
    return expanded


def _shape_for_target(config: PretrainedConfig, target: float, axes: frozenset[str]) -> PrunedShape:
    if isinstance(target, bool) or not isinstance(target, (int, float)):
        raise ValueError(f"student.target_params={target!r} must be a number of parameters")
    search = _ShapeSearch(PrunedShape.of(config), axes, _param_counter(config))
    teacher_params = search.count(search.teacher)
    if target > teacher_params:
        raise ValueError(f"student.target_params={target} exceeds the teacher's {teacher_params} parameters")
    smallest = search.count(search.scaled(0.0))
    if smallest > target:
        raise ValueError(
            f"student.target_params={target} is below {smallest}, the smallest student shrinking {sorted(axes)} gives"
        )
    return search.largest_within(target)


def choose_shape(
    config: PretrainedConfig,
    target_params: int | None = None,
    shape: Mapping[str, int] | None = None,
    axes: Iterable[str] = ("depth",),
) -> PrunedShape:
    """The student's shape: ``shape`` (partial; unset fields keep the teacher's) or the largest at ``target_params``."""
    if (target_params is None) == (shape is None):
        raise ValueError(f"give exactly one of student.target_params={target_params!r} and student.shape={shape!r}")
    if shape is not None:
        return _explicit_shape(PrunedShape.of(config), shape)
    return _shape_for_target(config, target_params, _expand_axes(axes))


def _top(values: Tensor, count: int) -> Tensor:
    """Indices of the ``count`` largest values, in their original order."""
    return torch.topk(values, count).indices.sort().values


def kept_indices(
    config: PretrainedConfig, shape: PrunedShape, scores: ImportanceScores, layer_score: str = "auto"
) -> KeptIndices:
    """Pick the top-scored layers, then per kept layer its top FFN channels and KV groups, and hidden channels."""
    teacher = PrunedShape.of(config)
    measured = (len(scores.block_influence), len(scores.hidden), scores.ffn.shape[1], scores.heads.shape[1])
    expected = (teacher.num_layers, teacher.hidden_size, teacher.intermediate_size, teacher.num_attention_heads)
    if measured != expected:
        raise ValueError(f"scores of (layers, hidden, ffn, heads)={measured} do not fit the model's {expected}")
    layers = _top(scores.depth(layer_score), shape.num_layers).tolist()
    groups = scores.kv_groups(teacher.num_key_value_heads)
    return KeptIndices(
        layers=layers,
        ffn=[_top(scores.ffn[index], shape.intermediate_size) for index in layers],
        kv_groups=[_top(groups[index], shape.num_key_value_heads) for index in layers],
        hidden=_top(scores.hidden, shape.hidden_size),
    )


def _slice_linear(linear: nn.Linear, rows: Tensor | None = None, columns: Tensor | None = None) -> None:
    """Keep output features ``rows`` and input features ``columns`` of ``linear``, in place."""
    weight = linear.weight.detach()
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.detach().index_select(0, rows.to(weight.device)))
    if columns is not None:
        weight = weight.index_select(1, columns.to(weight.device))
    linear.weight = nn.Parameter(weight)
    linear.out_features, linear.in_features = weight.shape


def _slice_norm(norm: nn.Module, hidden: Tensor) -> None:
    for name in ("weight", "bias"):
        param = getattr(norm, name, None)
        if isinstance(param, nn.Parameter):
            setattr(norm, name, nn.Parameter(param.detach().index_select(0, hidden.to(param.device))))


def _unit_rows(units: Tensor, unit_size: int) -> Tensor:
    """Indices of all members of whole units (heads, groups) laid out as consecutive blocks of ``unit_size``."""
    return (units[:, None] * unit_size + torch.arange(unit_size)).flatten()


def _set_existing(module: nn.Module, **values: int) -> None:
    # Some transformers versions cache sizes on modules; keep those that exist consistent.
    for name, value in values.items():
        if hasattr(module, name):
            setattr(module, name, value)


def _slice_attention(attention: nn.Module, groups: Tensor, hidden: Tensor, shape: PrunedShape, head_dim: int) -> None:
    query_rows = _unit_rows(_unit_rows(groups, shape.queries_per_group), head_dim)
    kv_rows = _unit_rows(groups, head_dim)
    _slice_linear(attention.q_proj, query_rows, hidden)
    _slice_linear(attention.k_proj, kv_rows, hidden)
    _slice_linear(attention.v_proj, kv_rows, hidden)
    _slice_linear(attention.o_proj, hidden, query_rows)
    _set_existing(
        attention,
        num_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        hidden_size=shape.hidden_size,
    )


def _slice_layer(layer: nn.Module, index: int, kept: KeptIndices, shape: PrunedShape, head_dim: int) -> None:
    for module in layer.modules():
        if hasattr(module, "layer_idx"):
            module.layer_idx = index  # caches are addressed by it
    _slice_attention(layer.self_attn, kept.kv_groups[index], kept.hidden, shape, head_dim)
    _slice_linear(layer.mlp.gate_proj, kept.ffn[index], kept.hidden)
    _slice_linear(layer.mlp.up_proj, kept.ffn[index], kept.hidden)
    _slice_linear(layer.mlp.down_proj, kept.hidden, kept.ffn[index])
    _set_existing(layer.mlp, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size)
    _set_existing(layer, hidden_size=shape.hidden_size)
    _slice_norm(layer.input_layernorm, kept.hidden)
    _slice_norm(layer.post_attention_layernorm, kept.hidden)


def _slice_embeddings(model: PreTrainedModel, hidden: Tensor) -> None:
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight is embed.weight
    embed.weight = nn.Parameter(embed.weight.detach().index_select(1, hidden.to(embed.weight.device)))
    embed.embedding_dim = len(hidden)
    if tied:
        head.weight = embed.weight
    else:
        _slice_linear(head, columns=hidden)


def _cut(model: PreTrainedModel, shape: PrunedShape, kept: KeptIndices) -> PreTrainedModel:
    student = copy.deepcopy(model)
    head_dim = head_dim_of(student.config)
    layers = decoder_layers(student)
    student.model.layers = nn.ModuleList([layers[index] for index in kept.layers])
    for index, layer in enumerate(student.model.layers):
        _slice_layer(layer, index, kept, shape, head_dim)
    _slice_embeddings(student, kept.hidden)
    _slice_norm(student.model.norm, kept.hidden)
    # Modules share the model's config object, so this updates what they read at run time too.
    _apply_shape(student.config, shape, kept.layers, head_dim)
    return student


def prune(
    model: PreTrainedModel, shape: PrunedShape, scores: ImportanceScores, *, layer_score: str = "auto"
) -> PreTrainedModel:
    """A new dense model of ``shape`` keeping the top-scored layers and channels; ``model`` is untouched."""
    _validated(shape, PrunedShape.of(model.config))
    return _cut(model, shape, kept_indices(model.config, shape, scores, layer_score))


def _stats(values: Tensor) -> dict[str, float]:
    return {"min": values.min().item(), "mean": values.mean().item(), "max": values.max().item()}


def _kept_summary(scores: Tensor, layers: list[int], kept: list[Tensor]) -> dict[str, Any]:
    """Score stats of the teacher's layers plus, per kept layer, how many units and how much score mass stay."""
    pairs = zip(layers, kept, strict=True)
    fractions = [(scores[layer, index].sum() / scores[layer].sum()).item() for layer, index in pairs]
    return {**_stats(scores), "kept_per_layer": [len(index) for index in kept], "kept_score_fraction": fractions}


def _report(teacher: PreTrainedModel, student: PreTrainedModel, scores: ImportanceScores, kept: KeptIndices) -> dict:
    nll, groups = scores.nll_increase, scores.kv_groups(PrunedShape.of(teacher.config).num_key_value_heads)
    return {
        "teacher_shape": asdict(PrunedShape.of(teacher.config)),
        "student_shape": asdict(PrunedShape.of(student.config)),
        "params": {
            "teacher_total": teacher.num_parameters(),
            "teacher_decoder_layers": decoder_layer_params(teacher),
            "student_total": student.num_parameters(),
            "student_decoder_layers": decoder_layer_params(student),
        },
        "baseline_nll": scores.baseline_nll,
        "depth_scores": {
            "nll_increase": None if nll is None else nll.tolist(),
            "block_influence": scores.block_influence.tolist(),
        },
        "kept_layers": kept.layers,
        "width": {
            "ffn": _kept_summary(scores.ffn, kept.layers, kept.ffn),
            "kv_groups": _kept_summary(groups, kept.layers, kept.kv_groups),
            "hidden": {**_stats(scores.hidden), "kept": len(kept.hidden)},
        },
    }


def pruned_student(
    teacher_model: PreTrainedModel,
    calibration: Iterable[dict[str, Tensor]],
    *,
    target_params: int | None = None,
    shape: Mapping[str, int] | None = None,
    axes: Iterable[str] = ("depth",),
    layer_score: str = "nll",
    report_path: str | None = None,
) -> PreTrainedModel:
    """Measure importance on ``calibration``, choose the shape, prune; the student is trainable."""
    if layer_score not in LAYER_SCORES:
        raise ValueError(f"student.layer_score={layer_score!r} must be one of {LAYER_SCORES}")
    chosen = choose_shape(teacher_model.config, target_params, shape, axes)
    # Skipping each layer in turn costs one forward pass per layer: measured only when it ranks layers to drop.
    drops_layers = chosen.num_layers < teacher_model.config.num_hidden_layers
    scores = calibration_scores(teacher_model, calibration, measure_nll=drops_layers and layer_score == "nll")
    # Every layer stays when none is dropped: any ranking keeps them all.
    ranking = layer_score if drops_layers else "bi"
    kept = kept_indices(teacher_model.config, chosen, scores, ranking)
    student = _cut(teacher_model, chosen, kept)
    if report_path is not None:
        report = _report(teacher_model, student, scores, kept)
        report.update(target_params=target_params, layer_score=layer_score)
        Path(report_path).parent.mkdir(parents=True, exist_ok=True)
        Path(report_path).write_text(json.dumps(report, indent=2))
    student.requires_grad_(True)
    return student.train()
