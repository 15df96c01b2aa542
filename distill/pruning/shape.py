"""The shape of a structurally pruned student: explicit, or the largest that fits a parameter target.

- :class:`PrunedShape` holds the student's sizes; ``head_dim`` is always the teacher's.
- :func:`choose_shape` turns either an explicit (partial) shape or a total parameter target into a
  :class:`PrunedShape`. Parameters are counted by building the student on the meta device, so they
  equal ``model.num_parameters()`` exactly (tied embeddings once, biases of any Llama-layout family).

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
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from distill.architectures.layouts import Sizes, head_dim_is_free, intermediate_key

log = logging.getLogger(__name__)
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
        sizes = Sizes.of(config)
        return cls(config.num_hidden_layers, sizes.hidden, sizes.intermediate, sizes.heads, sizes.kv_heads)

    @property
    def queries_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def cuts_width(self, teacher: PrunedShape) -> bool:
        """Whether any width (hidden, FFN, heads) is smaller than the teacher's."""
        return replace(self, num_layers=teacher.num_layers) != teacher


@dataclass
class PartialShape:
    """``student.shape`` of the ``pruned`` student: an explicit shape whose unset (None) fields keep the
    teacher's; a shape with none set is no shape (``target_params`` decides)."""

    num_layers: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None

    def given(self) -> dict[str, int] | None:
        """The fields set, as :func:`choose_shape` takes them, or None when none is."""
        sizes = {name: value for name, value in asdict(self).items() if value is not None}
        return sizes or None


def apply_shape(config: PretrainedConfig, shape: PrunedShape, kept_layers: Sequence[int]) -> None:
    """Write ``shape`` into ``config`` under the family's own keys; per-layer lists keep the kept layers'."""
    updates = {
        "num_hidden_layers": shape.num_layers,
        "hidden_size": shape.hidden_size,
        intermediate_key(config): shape.intermediate_size,
        "num_attention_heads": shape.num_attention_heads,
    }
    if hasattr(config, "num_key_value_heads"):
        updates["num_key_value_heads"] = shape.num_key_value_heads
    if head_dim_is_free(config):
        # hidden_size / num_attention_heads no longer gives the head size once either is pruned.
        updates["head_dim"] = Sizes.of(config).head_dim
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        updates["layer_types"] = [layer_types[index] for index in kept_layers]
    config.update(updates)


def shape_params(config: PretrainedConfig, shape: PrunedShape) -> int:
    """Exact parameter count of ``config``'s causal-LM class at ``shape`` (built on the meta device)."""
    student_config = copy.deepcopy(config)
    apply_shape(student_config, shape, range(shape.num_layers))
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


def validated(shape: PrunedShape, teacher: PrunedShape, given: Iterable[str] = ()) -> PrunedShape:
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
    return validated(replace(teacher, **sizes), teacher, given=shape.keys())


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
    chosen = search.largest_within(target)
    if "hidden" in axes and hidden_step(chosen.num_attention_heads) > HIDDEN_MULTIPLE:
        log.info(
            "student hidden_size=%d: the hidden width moves in steps of %d, multiples of %d and of the %d heads "
            "(transformers builds no config whose hidden size the head count does not divide)",
            chosen.hidden_size, hidden_step(chosen.num_attention_heads), HIDDEN_MULTIPLE, chosen.num_attention_heads,
        )  # fmt: skip
    return chosen


def choose_shape(
    config: PretrainedConfig,
    target_params: int | None = None,
    shape: Mapping[str, int] | None = None,
    axes: Iterable[str] = ("depth",),
) -> PrunedShape:
    """The student's shape: ``shape`` (partial; unset fields keep the teacher's) or the largest at ``target_params``."""
    if target_params is None and shape is None:
        raise ValueError("student.target_params and student.shape are both null: set one of them")
    if target_params is not None and shape is not None:  # a preset sets one, the command line the other
        raise ValueError(
            f"student.target_params={target_params!r} and student.shape={dict(shape)} are both set: give one, "
            "e.g. add student.target_params=null to cut to the shape, or student.shape=null"
        )
    if shape is not None:
        return _expressible(config, _explicit_shape(PrunedShape.of(config), shape))
    return _shape_for_target(config, target_params, _expressible_axes(config, _expand_axes(axes)))


COUPLED = frozenset({"hidden", "heads"})


def _coupling(config: PretrainedConfig) -> str:
    return (
        f"{type(config).__name__} derives head_dim from hidden_size / num_attention_heads, so the hidden "
        "width and the heads stay the teacher's"
    )


def _expressible_axes(config: PretrainedConfig, axes: frozenset[str]) -> frozenset[str]:
    """The axes the family's config can express; the others are dropped, and the log says so."""
    if head_dim_is_free(config) or not axes & COUPLED:
        return axes
    kept = axes - COUPLED
    if not kept:
        raise ValueError(f"student.axes={sorted(axes)}: {_coupling(config)}; shrink depth or ffn")
    log.warning("student.axes=%s: %s; shrinking %s only", sorted(axes), _coupling(config), sorted(kept))
    return kept


def _expressible(config: PretrainedConfig, shape: PrunedShape) -> PrunedShape:
    teacher = PrunedShape.of(config)
    if not head_dim_is_free(config):
        for name in ("hidden_size", "num_attention_heads", "num_key_value_heads"):
            if getattr(shape, name) != getattr(teacher, name):
                raise ValueError(f"student.shape.{name}={getattr(shape, name)}: {_coupling(config)}")
    return shape
