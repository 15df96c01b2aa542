"""Structured pruning of a Llama-family causal LM into a smaller dense student (Minitron / Sheared-LLaMA).

Contract:

- The student's shape comes from :mod:`distill.pruning.shape` (explicit, or a parameter target).
- :func:`prune` returns a NEW model of the teacher's class (the teacher is deep-copied, never changed)
  that keeps, by the :class:`~distill.pruning.scores.ImportanceScores`, the top layers (in their
  original order), per kept layer the top FFN channels and whole KV groups with their query heads, and
  the top hidden channels, sliced out of the embeddings, every norm, every projection and ``lm_head``
  (tied embeddings stay tied). ``head_dim`` is kept and written to ``config.head_dim``. The result
  round-trips through ``save_pretrained`` / ``AutoModelForCausalLM.from_pretrained``.
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
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel

from distill.pruning.scores import LAYER_SCORES, ImportanceScores, calibration_scores, decoder_layers
from distill.pruning.shape import PrunedShape, apply_shape, choose_shape, head_dim_of, validated


@dataclass(frozen=True)
class KeptIndices:
    """What the student keeps, as sorted indices into the teacher's layers and channels."""

    layers: list[int]
    ffn: list[Tensor]  # per kept layer: intermediate channels
    kv_groups: list[Tensor]  # per kept layer: KV heads (each with its query heads)
    hidden: Tensor


def decoder_layer_params(model: PreTrainedModel) -> int:
    """Parameters inside the decoder layers (embeddings, final norm and ``lm_head`` excluded)."""
    return sum(param.numel() for param in decoder_layers(model).parameters())


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
    apply_shape(student.config, shape, kept.layers, head_dim)
    return student


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
