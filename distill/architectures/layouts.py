"""Where a causal LM's decoder layers are and what each holds: the map that structured pruning cuts by.

A :class:`Layout` names, for one model, the decoder-layer stack, the final norm, the hidden-width
embeddings and LM head, and per layer every projection with what its output rows and input columns
are (hidden channels, query heads, KV heads, FFN channels) plus every norm and the width it runs on.

Most of it comes from transformers itself (:func:`layout_of`):

- ``config.base_model_pp_plan`` lists the base model's stages in order: embeddings first, the layer
  stack (:func:`~distill.architectures.linears.block_stack`), the final norm last.
- ``config.base_model_tp_plan`` marks each projection ``colwise`` (split by output channel: its rows
  are heads or FFN channels) or ``rowwise`` (split by input channel: it maps heads or FFN channels
  back to the hidden width). Whether a projection is attention or MLP is its parent module's; what its
  rows hold follows from its size (a fused ``qkv_proj`` is query + key + value heads, a fused
  ``gate_up_proj`` two FFN blocks).
- Norms are found by place and size: directly in the layer on the hidden width; inside attention per
  head (Qwen3, Gemma 3: untouched by head pruning) or over all query / KV heads (OLMo 2).

Hand-written here only what those plans do not say: one :class:`Entry` per family in :data:`ENTRIES`.
A layout covers every parameter of a layer or :func:`layout_of` refuses, naming the parameter, the
model class and this file: adding a family is at most one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from distill.architectures.linears import block_stack

ADAPTER_FILE = "distill/architectures/layouts.py"


@dataclass(frozen=True)
class Entry:
    """What transformers' plans do not say about a family: one of these per family in :data:`ENTRIES`.

    ``tp_plan``/``stages`` stand in for ``base_model_tp_plan``/``base_model_pp_plan`` where a family has
    none; ``interleaved`` names fused query/key/value projections laid out head by head ([q, k, v] of
    head 0, then head 1, ...) rather than as three blocks; ``head_dim_from_width``: the attention derives
    head_dim as hidden_size / num_attention_heads (no head_dim key), so the hidden width and the heads
    could only shrink together, which no cut here does; ``intermediate_key``: the config's FFN width.
    """

    tp_plan: dict[str, str] | None = None
    stages: tuple[str, ...] | None = None
    interleaved: tuple[str, ...] = ()
    head_dim_from_width: bool = False
    intermediate_key: str = "intermediate_size"


ENTRIES: dict[str, Entry] = {
    # Conv1D projections in transformer.h; n_inner None means 4 x hidden.
    "gpt2": Entry(
        tp_plan={"h.*.attn.c_attn": "colwise", "h.*.attn.c_proj": "rowwise", "h.*.mlp.c_fc": "colwise",
                 "h.*.mlp.c_proj": "rowwise"},
        stages=("wte", "wpe", "h", "ln_f"),
        head_dim_from_width=True,
        intermediate_key="n_inner",
    ),
    "gpt_neox": Entry(interleaved=("attention.query_key_value",), head_dim_from_width=True),
    # OPT's decoder.layers hold the attention and fc1/fc2 directly; learned positions are an Embedding.
    "opt": Entry(
        tp_plan={"decoder.layers.*.self_attn.q_proj": "colwise", "decoder.layers.*.self_attn.k_proj": "colwise",
                 "decoder.layers.*.self_attn.v_proj": "colwise", "decoder.layers.*.self_attn.out_proj": "rowwise",
                 "decoder.layers.*.fc1": "colwise", "decoder.layers.*.fc2": "rowwise"},
        stages=("decoder.embed_tokens", "decoder.embed_positions", "decoder.layers", "decoder.final_layer_norm"),
        head_dim_from_width=True,
        intermediate_key="ffn_dim",
    ),
}  # fmt: skip
DEFAULT_ENTRY = Entry()


class UnsupportedArchitecture(ValueError):
    """No layout for this model: width pruning and the ONNX decoder cannot cut or trace it."""


def unsupported(model: PreTrainedModel, why: str) -> UnsupportedArchitecture:
    return UnsupportedArchitecture(
        f"{type(model).__name__} ({model.config.model_type}): {why}; add its layout to {ADAPTER_FILE}"
    )


@dataclass(frozen=True)
class Projection:
    """One Linear (or Conv1D) of a decoder layer: what its output rows and input columns hold.

    ``rows`` are the output's blocks in order, each ``hidden``, ``query``, ``kv`` or ``ffn``;
    ``columns`` is ``hidden``, ``query`` or ``ffn``. ``interleaved``: the blocks repeat head by head.
    ``transposed``: the weight is stored ``[in, out]`` (Conv1D)."""

    path: str
    rows: tuple[str, ...]
    columns: str
    interleaved: bool = False
    transposed: bool = False


@dataclass(frozen=True)
class Sizes:
    """The widths a layout's blocks are measured in."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @classmethod
    def of(cls, config: PretrainedConfig) -> Sizes:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.hidden_size, heads, kv_heads, head_dim, intermediate_size(config))

    def block(self, kind: str) -> int:
        widths = {"hidden": self.hidden, "query": self.heads * self.head_dim, "kv": self.kv_heads * self.head_dim}
        return widths.get(kind, self.intermediate)


@dataclass(frozen=True)
class Layout:
    """A model's decoder stack and, per layer, every parameter's role (paths relative to the layer)."""

    layers: str  # e.g. "model.layers"
    final_norm: str
    embeddings: tuple[str, ...]  # tables whose columns are the hidden width (tokens, learned positions)
    lm_head: str  # its columns are the hidden width too (the same tensor as the tokens' table when tied)
    projections: tuple[Projection, ...]
    hidden_norms: tuple[str, ...]
    head_norms: tuple[tuple[str, str], ...]  # (path, "per_head" | "query" | "kv")

    def projection(self, columns: str) -> Projection:
        """The projection back to the hidden width from ``query`` heads (attention) or ``ffn`` channels."""
        return next(projection for projection in self.projections if projection.columns == columns)


def entry(config: PretrainedConfig) -> Entry:
    return ENTRIES.get(config.model_type, DEFAULT_ENTRY)


def intermediate_size(config: PretrainedConfig) -> int:
    width = getattr(config, intermediate_key(config), None)
    return 4 * config.hidden_size if width is None else width


def intermediate_key(config: PretrainedConfig) -> str:
    return entry(config).intermediate_key


def head_dim_is_free(config: PretrainedConfig) -> bool:
    """Whether the family reads ``head_dim`` from its config (else hidden and heads are cut together)."""
    return not entry(config).head_dim_from_width


def plans(config: PretrainedConfig) -> tuple[dict[str, str], tuple[str, ...]] | None:
    """(tensor-parallel plan, pipeline stages) of the base model: this file's entry, else transformers'."""
    known = entry(config)
    tp_plan = known.tp_plan or getattr(config, "base_model_tp_plan", None)
    stages = known.stages or tuple(getattr(config, "base_model_pp_plan", None) or ())
    return (tp_plan, stages) if tp_plan and stages else None


def has_layout(model: PreTrainedModel) -> bool:
    try:
        layout_of(model)
    except UnsupportedArchitecture:
        return False
    return True


def _is_attention(module: nn.Module) -> bool:
    # transformers names every attention implementation *Attention (LlamaAttention, GPTNeoXAttention, ...).
    return type(module).__name__.endswith("Attention")


def _rows(model: PreTrainedModel, path: str, out_features: int, attention: bool, sizes: Sizes) -> tuple[str, ...]:
    """What a column-split projection's output holds, told by its width."""
    query, kv, ffn = sizes.block("query"), sizes.block("kv"), sizes.intermediate
    candidates = (
        {query: ("query",), kv: ("kv",), query + 2 * kv: ("query", "kv", "kv")}
        if attention
        else {ffn: ("ffn",), 2 * ffn: ("ffn", "ffn")}
    )
    if out_features not in candidates:
        raise unsupported(model, f"cannot tell what the {out_features} outputs of {path} are")
    return candidates[out_features]


def _projection(model: PreTrainedModel, layer: nn.Module, path: str, split: str, sizes: Sizes) -> Projection:
    module = layer.get_submodule(path)
    parent = layer.get_submodule(path.rpartition(".")[0]) if "." in path else layer
    attention, transposed = _is_attention(parent), isinstance(module, Conv1D)
    out_features = module.weight.shape[1] if transposed else module.weight.shape[0]
    interleaved = path in entry(model.config).interleaved
    if split.startswith("rowwise"):
        return Projection(path, ("hidden",), "query" if attention else "ffn", interleaved, transposed)
    return Projection(path, _rows(model, path, out_features, attention, sizes), "hidden", interleaved, transposed)


def _norms(
    layer: nn.Module, projections: set[str], sizes: Sizes
) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Modules holding one weight vector: hidden-width norms of the layer, and norms inside attention."""
    hidden, heads = [], []
    per_width = {sizes.head_dim: "per_head", sizes.block("query"): "query", sizes.block("kv"): "kv"}
    for path, module in layer.named_modules():
        weight = getattr(module, "weight", None)
        if path in projections or not isinstance(weight, nn.Parameter) or weight.dim() != 1:
            continue
        parent = layer.get_submodule(path.rpartition(".")[0]) if "." in path else layer
        if _is_attention(parent) and weight.numel() in per_width:
            heads.append((path, per_width[weight.numel()]))
        elif weight.numel() == sizes.hidden:
            hidden.append(path)
    return tuple(hidden), tuple(heads)


def _check_covered(model: PreTrainedModel, layer: nn.Module, covered: set[str]) -> None:
    for name, _ in layer.named_parameters():
        if name.rpartition(".")[0] not in covered:
            raise unsupported(model, f"decoder-layer parameter {name} has no known role")


def layout_of(model: PreTrainedModel) -> Layout:
    """The model's :class:`Layout`, from transformers' plans and this file's entries; refuses in one line
    (:class:`UnsupportedArchitecture`) when a parameter's role is unknown."""
    found = plans(model.config)
    if found is None:
        raise unsupported(model, "no tensor-parallel plan (config.base_model_tp_plan) and no entry here")
    tp_plan, stages = found
    stack_path, stack = block_stack(model)
    layer, sizes, prefix = stack[0], Sizes.of(model.config), model.base_model_prefix
    layer_key = f"{stack_path.removeprefix(prefix + '.')}.*."
    splits = {key.removeprefix(layer_key): split for key, split in tp_plan.items() if key.startswith(layer_key)}
    projections = tuple(
        _projection(model, layer, path, split, sizes) for path, split in splits.items() if "wise" in split
    )
    hidden_norms, head_norms = _norms(layer, {projection.path for projection in projections}, sizes)
    _check_covered(model, layer, {p.path for p in projections} | set(hidden_norms) | {p for p, _ in head_norms})
    if not any(p.columns == "query" for p in projections) or not any(p.columns == "ffn" for p in projections):
        raise unsupported(model, "no attention output or MLP output projection in its plan")
    return Layout(
        layers=stack_path,
        final_norm=f"{prefix}.{stages[-1]}",
        embeddings=_hidden_embeddings(model, sizes.hidden),
        lm_head=_name_of(model, model.get_output_embeddings()),
        projections=projections,
        hidden_norms=hidden_norms,
        head_norms=head_norms,
    )


def _name_of(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)


def _hidden_embeddings(model: PreTrainedModel, hidden: int) -> tuple[str, ...]:
    return tuple(
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Embedding) and module.embedding_dim == hidden
    )
