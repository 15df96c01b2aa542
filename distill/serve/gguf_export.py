"""GGUF export of a Hugging Face causal-LM student, for llama.cpp.

One ``.gguf`` file holds the hyperparameters, the byte-level BPE tokenizer (``distill.serve.gguf_vocab``) and the
weights, each in the type ``llama-quantize`` would give it under the chosen preset (``distill.serve.gguf_types``),
written with the ``gguf`` package's writer. Families: Llama and Mistral (llama.cpp's ``llama`` architecture, whose
RoPE pairs adjacent elements, so q/k rows are permuted back from HF's rotate-half order), Qwen2 (q/k/v biases) and
Qwen3 (q/k norms, explicit head size). Anything else, a parameter with no place in the file, or RoPE scaling
llama.cpp would apply differently is one error line.

Students with one-shot masks (2:4 zeros) or from QAT are plain Hugging Face models and export like any other; the
zeros are stored as they are, and llama.cpp's CPU kernels multiply them: no sparsity speed-up survives the export.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, GGMLQuantizationType, GGUFWriter
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from distill.serve.ggml_quant import MISSING_RUNTIME, quantize_rows, runtime_available
from distill.serve.gguf_types import K_QUANTS, Preset, preset, tensor_type
from distill.serve.gguf_vocab import add_vocab

log = logging.getLogger(__name__)
FAMILIES = {
    "llama": MODEL_ARCH.LLAMA,
    "mistral": MODEL_ARCH.LLAMA,
    "qwen2": MODEL_ARCH.QWEN2,
    "qwen3": MODEL_ARCH.QWEN3,
}
# llama.cpp's llama architecture rotates adjacent pairs; HF's Llama rotates the two halves of each head.
HALVES_TO_PAIRS = frozenset({"llama", "mistral"})
# HF model_type -> llama.cpp architecture name, where the two spell it differently.
ALIASES = {"gpt_neox": "gptneox", "cohere": "command-r", "phi": "phi2", "gpt_bigcode": "starcoder",
           "gemma3_text": "gemma3", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}  # fmt: skip


class UnsupportedGGUFArchitecture(ValueError):
    """The model's family has no GGUF mapping here (or none in llama.cpp at all)."""


def gguf_arch(model_type: str) -> MODEL_ARCH:
    """llama.cpp's architecture for an HF ``model_type`` that this export maps."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    supported = ", ".join(FAMILIES)
    llama_cpp_name = ALIASES.get(model_type, model_type)
    if llama_cpp_name in MODEL_ARCH_NAMES.values() or llama_cpp_name.replace("_", "") in MODEL_ARCH_NAMES.values():
        raise UnsupportedGGUFArchitecture(
            f"llama.cpp knows {model_type!r} but distill's GGUF export maps only {supported}"
        )
    raise UnsupportedGGUFArchitecture(f"llama.cpp has no architecture for model_type {model_type!r}")


def _rope(config: PretrainedConfig) -> tuple[float, float | None]:
    """RoPE base and linear scaling factor (None: unscaled); other scalings are refused."""
    params = getattr(config, "rope_parameters", None) or {
        **(getattr(config, "rope_scaling", None) or {}),
        "rope_theta": getattr(config, "rope_theta", 10000.0),
    }
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ValueError(f"rope_scaling {kind!r} is not exported to GGUF; only unscaled and 'linear' RoPE are")
    return float(params["rope_theta"]), float(params["factor"]) if kind == "linear" else None


def _kv_heads(config: PretrainedConfig) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _context_length(config: PretrainedConfig) -> int:
    # llama.cpp's llama architecture attends to the whole context; up to the sliding window, that is what a
    # Mistral with a window computes, so the window is the context length the file promises.
    window = getattr(config, "sliding_window", None)
    if config.model_type == "mistral" and window:
        return min(window, config.max_position_embeddings)
    return config.max_position_embeddings


def _add_hyperparameters(writer: GGUFWriter, config: PretrainedConfig, chosen: Preset, name: str) -> None:
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config.hidden_act!r}: llama.cpp's {writer.arch} blocks use SiLU (SwiGLU)")
    if writer.arch == "qwen2" and _head_dim(config) * config.num_attention_heads != config.hidden_size:
        raise ValueError(
            f"head_dim {_head_dim(config)} x {config.num_attention_heads} heads != hidden_size {config.hidden_size}: "
            "llama.cpp's qwen2 architecture sizes attention by the hidden width"
        )
    theta, linear_factor = _rope(config)
    writer.add_name(name)
    writer.add_context_length(_context_length(config))
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(_kv_heads(config))
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))
    writer.add_rope_dimension_count(_head_dim(config))
    writer.add_rope_freq_base(theta)
    if linear_factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(linear_factor)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(chosen.file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _halves_to_pairs(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from HF's (first half, second half) RoPE layout to llama.cpp's adjacent pairs."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _placed(model: PreTrainedModel, arch: MODEL_ARCH) -> list[tuple[str, str, torch.Tensor]]:
    """(HF name, GGUF name, parameter) for every parameter; one that the mapping cannot place is an error."""
    names = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    placed, unplaced = [], []
    for hf_name, parameter in model.named_parameters():  # a tied head is the embedding: listed once
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            unplaced.append(hf_name)
        placed.append((hf_name, gguf_name, parameter))
    if unplaced:
        shown = ", ".join(unplaced[:4]) + (f" and {len(unplaced) - 4} more" if len(unplaced) > 4 else "")
        raise ValueError(f"GGUF export has no place in llama.cpp's {MODEL_ARCH_NAMES[arch]} for parameter(s) {shown}")
    return placed


def _weights(hf_name: str, parameter: torch.Tensor, config: PretrainedConfig) -> np.ndarray:
    weight = parameter.detach().to(torch.float32).cpu()
    if config.model_type in HALVES_TO_PAIRS:
        if ".q_proj." in hf_name:
            weight = _halves_to_pairs(weight, config.num_attention_heads)
        elif ".k_proj." in hf_name:
            weight = _halves_to_pairs(weight, _kv_heads(config))
    return weight.numpy()


def _encode(array: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    if qtype in K_QUANTS:
        return quantize_rows(array, qtype)
    return gguf.quants.quantize(array, qtype)


def _types(placed: list[tuple[str, str, torch.Tensor]], chosen: Preset, layers: int) -> list[GGMLQuantizationType]:
    tied = not any(gguf_name == "output.weight" for _, gguf_name, _ in placed)
    types = [tensor_type(gguf_name, tuple(p.shape), chosen, layers, tied) for _, gguf_name, p in placed]
    if chosen.default in K_QUANTS and not runtime_available():
        raise RuntimeError(MISSING_RUNTIME)
    if any(qtype in K_QUANTS for qtype in types) and not runtime_available():
        # Simplified: without llama.cpp's quantizer the Q6_K output matrix of a 32-block preset becomes Q8_0.
        log.warning("llama.cpp runtime not installed: the output matrix is written in Q8_0 instead of Q6_K")
        types = [GGMLQuantizationType.Q8_0 if qtype in K_QUANTS else qtype for qtype in types]
    return types


def export_gguf(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    quant: str = "f16",
    pre_tokenizer: str | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Write ``model`` and ``tokenizer`` as one llama.cpp GGUF file at ``path`` under quant preset ``quant``.

    ``pre_tokenizer`` overrides the detected ``tokenizer.ggml.pre``; ``name`` is ``general.name`` (default: the
    file's stem). Returns the file's size, its tensor count per type, the parameter count, arch and preset."""
    chosen = preset(quant)
    arch = gguf_arch(model.config.model_type)
    placed = _placed(model, arch)
    types = _types(placed, chosen, model.config.num_hidden_layers)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(path, MODEL_ARCH_NAMES[arch])
    _add_hyperparameters(writer, model.config, chosen, name or path.stem)
    pre = add_vocab(writer, tokenizer, model.config.vocab_size, pre_tokenizer)
    for (hf_name, gguf_name, parameter), qtype in zip(placed, types, strict=True):
        writer.add_tensor(gguf_name, _encode(_weights(hf_name, parameter, model.config), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "tensor_types": dict(Counter(qtype.name for qtype in types)),
        "parameters": sum(parameter.numel() for _, _, parameter in placed),
        "arch": MODEL_ARCH_NAMES[arch],
        "quant": chosen.name,
        "pre_tokenizer": pre,
    }
