"""Which GGML type each tensor of a GGUF export gets: the quant presets and llama.cpp's per-tensor rules.

The presets carry ``llama-quantize``'s names (lower case), and the choice of type per tensor mirrors
``llama_tensor_get_type`` in llama.cpp's ``src/llama-quant.cpp`` for the dense decoders that
``distill.serve.gguf_export`` writes (no experts, no fused QKV, no imatrix):

* only 2-D ``*.weight`` tensors are quantized; norms and biases (1-D) stay F32, as ``tensor_allows_quantization``
  keeps them; the float presets (f32/f16/bf16) give every 2-D weight the preset's type and no rules apply;
* the output matrix, or ``token_embd`` when the head is tied and the file has no ``output.weight``, becomes Q6_K
  for every quantized preset but q8_0, or Q8_0 outright when its rows are not a multiple of the preset's block;
* q4_k_m and q5_k_m give attn_v and ffn_down Q6_K on the layers ``use_more_bits`` picks (the first and last
  eighth of the layers and every third one between);
* a row length that is not a multiple of the chosen type's block size falls back as ``tensor_type_fallback`` does
  (Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0), and to F16 when even the fallback's block does not divide it.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

T = GGMLQuantizationType


@dataclass(frozen=True)
class Preset:
    name: str
    file_type: LlamaFileType
    default: GGMLQuantizationType

    @property
    def quantized(self) -> bool:
        return self.default not in (T.F32, T.F16, T.BF16)


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset("f32", LlamaFileType.ALL_F32, T.F32),
        Preset("f16", LlamaFileType.MOSTLY_F16, T.F16),
        Preset("bf16", LlamaFileType.MOSTLY_BF16, T.BF16),
        Preset("q8_0", LlamaFileType.MOSTLY_Q8_0, T.Q8_0),
        Preset("q4_0", LlamaFileType.MOSTLY_Q4_0, T.Q4_0),
        Preset("q4_1", LlamaFileType.MOSTLY_Q4_1, T.Q4_1),
        Preset("q5_0", LlamaFileType.MOSTLY_Q5_0, T.Q5_0),
        Preset("q5_1", LlamaFileType.MOSTLY_Q5_1, T.Q5_1),
        Preset("q4_k_m", LlamaFileType.MOSTLY_Q4_K_M, T.Q4_K),
        Preset("q5_k_m", LlamaFileType.MOSTLY_Q5_K_M, T.Q5_K),
        Preset("q6_k", LlamaFileType.MOSTLY_Q6_K, T.Q6_K),
    )
}
K_QUANTS = frozenset({T.Q4_K, T.Q5_K, T.Q6_K})
# tensor_type_fallback's table, for the types these presets can reach.
FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}


def preset(name: str) -> Preset:
    """The preset called ``name`` (case-insensitive); an unknown name lists the valid ones."""
    found = PRESETS.get(name.lower())
    if found is None:
        raise ValueError(f"unknown GGUF quant preset {name!r}; expected one of {', '.join(PRESETS)}")
    return found


def block_size(qtype: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def use_more_bits(layer: int, layers: int) -> bool:
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def fallback(qtype: GGMLQuantizationType, row_length: int) -> GGMLQuantizationType:
    """A type whose blocks divide ``row_length``: ``qtype`` itself, its fallback, else F16."""
    if row_length % block_size(qtype) == 0:
        return qtype
    demoted = FALLBACK.get(qtype, qtype)
    return demoted if row_length % block_size(demoted) == 0 else T.F16


def tensor_type(
    name: str, shape: tuple[int, ...], chosen: Preset, layers: int, tied: bool = False
) -> GGMLQuantizationType:
    """The type of GGUF tensor ``name`` of torch ``shape`` (rows, row length) under ``chosen``.

    ``tied``: the file has no ``output.weight``, so ``token_embd`` doubles as the output matrix."""
    if len(shape) < 2 or not name.endswith(".weight"):
        return T.F32
    if not chosen.quantized:
        return chosen.default
    row_length = shape[-1]
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        picked = _output_type(chosen.default, row_length)
    else:
        picked = _block_type(name, chosen, layers)
    return fallback(picked, row_length)


def _output_type(default: GGMLQuantizationType, row_length: int) -> GGMLQuantizationType:
    if row_length % block_size(default) != 0:
        return T.Q8_0
    return default if default == T.Q8_0 else T.Q6_K


def _block_type(name: str, chosen: Preset, layers: int) -> GGMLQuantizationType:
    # llama.cpp counts attn_v / ffn_down tensors in file order; one per block here, so the count is the block index.
    sensitive = name.startswith("blk.") and name.endswith(("attn_v.weight", "ffn_down.weight"))
    if chosen.name in ("q4_k_m", "q5_k_m") and sensitive and use_more_bits(int(name.split(".")[1]), layers):
        return T.Q6_K
    return chosen.default
