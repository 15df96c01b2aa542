"""Structured pruning of a causal LM of any family into a smaller dense student (Minitron / Sheared-LLaMA).

Contract:

- The student's shape comes from :mod:`distill.pruning.shape` (explicit, or a parameter target).
- :func:`prune` returns a NEW model of the teacher's class, built from the teacher's config with the
  new sizes (the teacher is never changed), that keeps, by the
  :class:`~distill.pruning.scores.ImportanceScores`, the top layers (in their original order), per kept
  layer the top FFN channels and whole KV groups with their query heads, and the top hidden channels.
  Depth alone works for any model whose decoder layers form a list; a width cut reads the family's
  :class:`~distill.architectures.layouts.Layout` (fused and transposed projections, biases, every norm,
  q/k norms, learned positions, ``lm_head``) and refuses families without one. ``head_dim`` is kept.
  Because the student is built from its config, it equals what ``save_pretrained`` /
  ``AutoModelForCausalLM.from_pretrained`` gives back.
- :func:`pruned_student` measures, chooses, prunes and optionally writes a JSON report.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import PretrainedConfig, PreTrainedModel

from distill.architectures.layouts import Layout, Projection, Sizes, has_layout, layout_of
from distill.architectures.linears import block_stack
from distill.pruning.scores import LAYER_SCORES, ImportanceScores, calibration_scores
from distill.pruning.shape import PrunedShape, apply_shape, choose_shape, validated


@dataclass(frozen=True)
class KeptIndices:
    """What the student keeps, as sorted indices into the teacher's layers and channels."""

    layers: list[int]
    ffn: list[Tensor]  # per kept layer: intermediate channels
    kv_groups: list[Tensor]  # per kept layer: KV heads (each with its query heads)
    hidden: Tensor


def decoder_layer_params(model: PreTrainedModel) -> int:
    """Parameters inside the decoder layers (embeddings, final norm and ``lm_head`` excluded)."""
    return sum(param.numel() for param in block_stack(model)[1].parameters())


def _top(values: Tensor, count: int) -> Tensor:
    """Indices of the ``count`` largest values, in their original order."""
    return torch.topk(values, count).indices.sort().values


def kept_indices(
    config: PretrainedConfig, shape: PrunedShape, scores: ImportanceScores, layer_score: str = "auto"
) -> KeptIndices:
    """Pick the top-scored layers, then per kept layer its top FFN channels and KV groups, and hidden channels
    (every channel, when the scores hold no width measure: a depth-only cut)."""
    teacher = PrunedShape.of(config)
    if len(scores.block_influence) != teacher.num_layers:
        raise ValueError(f"scores of {len(scores.block_influence)} layers do not fit the model's {teacher.num_layers}")
    layers = _top(scores.depth(layer_score), shape.num_layers).tolist()
    if scores.ffn is None:
        return KeptIndices(
            layers=layers,
            ffn=[torch.arange(teacher.intermediate_size)] * len(layers),
            kv_groups=[torch.arange(teacher.num_key_value_heads)] * len(layers),
            hidden=torch.arange(teacher.hidden_size),
        )
    measured = (len(scores.hidden), scores.ffn.shape[1], scores.heads.shape[1])
    expected = (teacher.hidden_size, teacher.intermediate_size, teacher.num_attention_heads)
    if measured != expected:
        raise ValueError(f"scores of (hidden, ffn, heads)={measured} do not fit the model's {expected}")
    groups = scores.kv_groups(teacher.num_key_value_heads)
    return KeptIndices(
        layers=layers,
        ffn=[_top(scores.ffn[index], shape.intermediate_size) for index in layers],
        kv_groups=[_top(groups[index], shape.num_key_value_heads) for index in layers],
        hidden=_top(scores.hidden, shape.hidden_size),
    )


def _unit_rows(units: Tensor, unit_size: int) -> Tensor:
    """Indices of all members of whole units (heads, groups) laid out as consecutive blocks of ``unit_size``."""
    return (units[:, None] * unit_size + torch.arange(unit_size)).flatten()


@dataclass(frozen=True)
class LayerCut:
    """The kept indices of each kind of block in one kept layer."""

    sizes: Sizes
    hidden: Tensor
    ffn: Tensor
    kv_groups: Tensor
    queries_per_group: int

    def block(self, kind: str) -> Tensor:
        if kind == "hidden":
            return self.hidden
        if kind == "ffn":
            return self.ffn
        heads = self.kv_groups if kind == "kv" else _unit_rows(self.kv_groups, self.queries_per_group)
        return _unit_rows(heads, self.sizes.head_dim)

    def rows(self, projection: Projection) -> Tensor:
        if projection.interleaved:  # [q, k, v] per head: whole heads (one query per KV head) stay
            return _unit_rows(self.kv_groups, len(projection.rows) * self.sizes.head_dim)
        offsets = torch.tensor([0, *(self.sizes.block(kind) for kind in projection.rows)]).cumsum(0)
        return torch.cat([self.block(kind) + offset for kind, offset in zip(projection.rows, offsets, strict=False)])


def _take(tensor: Tensor, dim: int, index: Tensor) -> Tensor:
    return tensor.index_select(dim, index.to(tensor.device))


def _cut_projection(name: str, tensor: Tensor, projection: Projection, cut: LayerCut) -> Tensor:
    out_dim = 1 if projection.transposed else 0
    tensor = _take(tensor, out_dim if name == "weight" else 0, cut.rows(projection))
    return _take(tensor, 1 - out_dim, cut.block(projection.columns)) if name == "weight" else tensor


def _cut_layer_tensor(path: str, tensor: Tensor, layout: Layout, cut: LayerCut) -> Tensor:
    module, _, name = path.rpartition(".")
    projection = next((p for p in layout.projections if p.path == module), None)
    if projection is not None:
        return _cut_projection(name, tensor, projection, cut)
    if module in layout.hidden_norms:
        return _take(tensor, 0, cut.hidden)
    width = dict(layout.head_norms).get(module, "per_head")
    return tensor if width == "per_head" else _take(tensor, 0, cut.block(width))


def _cut_outer_tensor(key: str, tensor: Tensor, layout: Layout, hidden: Tensor) -> Tensor:
    """Embedding tables and the LM head keep hidden columns; the final norm keeps hidden channels."""
    module, _, name = key.rpartition(".")
    if name == "weight" and (module in layout.embeddings or module == layout.lm_head):
        return _take(tensor, 1, hidden)
    return _take(tensor, 0, hidden) if module == layout.final_norm else tensor


def _cut_state(model: PreTrainedModel, shape: PrunedShape, kept: KeptIndices) -> dict[str, Tensor]:
    """The teacher's tensors for the student: kept layers renumbered, every width cut (when one shrinks)."""
    stack, _ = block_stack(model)
    new_index = {old: new for new, old in enumerate(kept.layers)}
    layout = layout_of(model) if shape.cuts_width(PrunedShape.of(model.config)) else None
    sizes, qpg = Sizes.of(model.config), PrunedShape.of(model.config).queries_per_group
    state = {}
    for key, tensor in model.state_dict().items():
        if not key.startswith(f"{stack}."):
            state[key] = tensor if layout is None else _cut_outer_tensor(key, tensor, layout, kept.hidden)
            continue
        index, _, path = key.removeprefix(f"{stack}.").partition(".")
        if int(index) not in new_index:
            continue
        new = new_index[int(index)]
        if layout is not None:
            cut = LayerCut(sizes, kept.hidden, kept.ffn[new], kept.kv_groups[new], qpg)
            tensor = _cut_layer_tensor(path, tensor, layout, cut)
        state[f"{stack}.{new}.{path}"] = tensor
    return state


def _cut(model: PreTrainedModel, shape: PrunedShape, kept: KeptIndices) -> PreTrainedModel:
    """A model of the teacher's own class and config at ``shape``, holding the kept weights: built from the
    config, so it is exactly what ``AutoModelForCausalLM.from_pretrained`` gives back after saving."""
    config = copy.deepcopy(model.config)
    apply_shape(config, shape, kept.layers)
    state = _cut_state(model, shape, kept)
    reference = next(iter(state.values()))
    student = type(model)(config)
    student.load_state_dict(state, strict=True)
    return student.to(device=reference.device, dtype=model.dtype).train(model.training)


def prune(
    model: PreTrainedModel, shape: PrunedShape, scores: ImportanceScores, *, layer_score: str = "auto"
) -> PreTrainedModel:
    """A new dense model of ``shape`` keeping the top-scored layers and channels; ``model`` is untouched."""
    validated(shape, PrunedShape.of(model.config))
    return _cut(model, shape, kept_indices(model.config, shape, scores, layer_score))


def _stats(values: Tensor) -> dict[str, float]:
    return {"min": values.min().item(), "mean": values.mean().item(), "max": values.max().item()}


def _kept_summary(scores: Tensor, layers: list[int], kept: list[Tensor]) -> dict[str, Any]:
    """Score stats of the teacher's layers plus, per kept layer, how many units and how much score mass stay."""
    pairs = zip(layers, kept, strict=True)
    fractions = [(scores[layer, index].sum() / scores[layer].sum()).item() for layer, index in pairs]
    return {**_stats(scores), "kept_per_layer": [len(index) for index in kept], "kept_score_fraction": fractions}


def _report(teacher: PreTrainedModel, student: PreTrainedModel, scores: ImportanceScores, kept: KeptIndices) -> dict:
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
            "nll_increase": None if scores.nll_increase is None else scores.nll_increase.tolist(),
            "block_influence": scores.block_influence.tolist(),
        },
        "kept_layers": kept.layers,
        "width": None if scores.ffn is None else _width_report(teacher.config, scores, kept),
    }


def _width_report(config: PretrainedConfig, scores: ImportanceScores, kept: KeptIndices) -> dict[str, Any]:
    groups = scores.kv_groups(PrunedShape.of(config).num_key_value_heads)
    return {
        "ffn": _kept_summary(scores.ffn, kept.layers, kept.ffn),
        "kv_groups": _kept_summary(groups, kept.layers, kept.kv_groups),
        "hidden": {**_stats(scores.hidden), "kept": len(kept.hidden)},
    }


def student_shape(
    teacher_model: PreTrainedModel,
    target_params: int | None = None,
    shape: Mapping[str, int] | None = None,
    axes: Iterable[str] = ("depth",),
) -> PrunedShape:
    """The shape :func:`pruned_student` cuts ``teacher_model`` to. Refuses in one line, before any calibration
    pass, a shape the family cannot express and a width cut of a family without a layout
    (:class:`~distill.architectures.layouts.UnsupportedArchitecture`)."""
    chosen = choose_shape(teacher_model.config, target_params, shape, axes)
    if chosen.cuts_width(PrunedShape.of(teacher_model.config)):
        layout_of(teacher_model)
    return chosen


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
    chosen = student_shape(teacher_model, target_params, shape, axes)
    teacher_shape = PrunedShape.of(teacher_model.config)
    # A depth cut reports the width scores where a layout exists (a width cut has one: student_shape checked).
    measure_width = chosen.cuts_width(teacher_shape) or has_layout(teacher_model)
    # Skipping each layer in turn costs one forward pass per layer: measured only when it ranks layers to drop.
    drops_layers = chosen.num_layers < teacher_shape.num_layers
    measure_nll = drops_layers and layer_score == "nll"
    scores = calibration_scores(teacher_model, calibration, measure_nll=measure_nll, measure_width=measure_width)
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
