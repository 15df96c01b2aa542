"""GGUF export: llama.cpp loads the file and computes what PyTorch computes; types follow llama-quantize."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from distill.serve import gguf_export
from distill.serve.ggml_quant import MISSING_RUNTIME, quantize_rows
from distill.serve.gguf_export import UnsupportedGGUFArchitecture, export_gguf
from distill.serve.gguf_types import preset, tensor_type
from distill.serve.gguf_vocab import LLAMA3_REGEX, QWEN2_REGEX
from distill.serve.llamacpp import LlamaCpp, MissingRuntime, runtime
from distill.utils.references import load_causal_lm, load_tokenizer
from tests.conftest import require
from tests.model_families import VOCAB, tiny_causal_lm

CORPUS = [
    f"Line {j} of the song of king {i}, and the hills sing {j * 7}.\n"
    f"The river runs on; a quiet wind moves by the old mill(year {1800 + j})!"
    for i in range(5)
    for j in range(40)
]
# Families as llama.cpp computes them: the tiny Mistral's 6-token window would cut its attention in PyTorch (the
# file says so in its context length, checked below), and llama.cpp's qwen2 sizes attention by the hidden width.
FULL_ATTENTION = {"mistral": {"sliding_window": None}, "qwen2": {"head_dim": 12}}
FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
LINEAR_ROPE = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False)


def byte_level_tokenizer(pre_tokenizer: Any, size: int = VOCAB) -> PreTrainedTokenizerFast:
    """A byte-level BPE of exactly ``size`` tokens, trained on ``CORPUS`` (whose characters it alone covers) with
    GPT-2's pre-tokenizer, so that it merges digits, then given ``pre_tokenizer``: the pre-tokenizers then split
    the same text into different tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=size, special_tokens=specials))
    assert tokenizer.get_vocab_size() == size
    tokenizer.pre_tokenizer = pre_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=specials[0], bos_token=specials[1],
                                   eos_token=specials[2])  # fmt: skip


PRE_TOKENIZERS = {
    "gpt-2": BYTE_LEVEL,
    "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), BYTE_LEVEL]),
    "llama-bpe": pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(LLAMA3_REGEX), "isolated"), pre_tokenizers.ByteLevel(False, use_regex=False)]
    ),
    "qwen2": pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(QWEN2_REGEX), "isolated"), pre_tokenizers.ByteLevel(False, use_regex=False)]
    ),
}


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return byte_level_tokenizer(PRE_TOKENIZERS["smollm"])


@pytest.fixture(scope="module")
def llama_cpp() -> None:
    try:
        runtime()
    except MissingRuntime as error:
        require(False, str(error))


def fields(path: Path) -> dict[str, Any]:
    return {name: field.contents() for name, field in gguf.GGUFReader(path).fields.items()}


def types(path: Path) -> dict[str, str]:
    return {tensor.name: tensor.tensor_type.name for tensor in gguf.GGUFReader(path).tensors}


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def steady_prompts(model: PreTrainedModel, count: int = 3, new_tokens: int = 16) -> list[tuple[list, list]]:
    """``count`` random prompts and their greedy continuations whose every step's top-1 leads by at least 0.005
    (tiny random models have near ties; f16 rounding moves these logits by about 5e-4)."""
    generator, found = torch.Generator().manual_seed(0), []
    for _ in range(48):
        prompt = torch.randint(3, VOCAB, (1, 6), generator=generator)
        with torch.no_grad():
            tokens = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            top2 = model(tokens[:, :-1]).logits[0, prompt.shape[1] - 1 :].topk(2).values
        if (top2[:, 0] - top2[:, 1]).min() >= 5e-3:
            found.append((prompt[0].tolist(), tokens[0, prompt.shape[1] :].tolist()))
        if len(found) == count:
            return found
    pytest.fail(f"only {len(found)} of 48 prompts decode without a near tie")


@pytest.mark.parametrize("quant", ["f32", "f16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_decodes_as_pytorch_does(family, quant, tokenizer, llama_cpp, tmp_path) -> None:
    model = tiny_causal_lm(family, **FULL_ATTENTION.get(family, {}))
    record = export_gguf(model, tokenizer, tmp_path / "model.gguf", quant)
    assert record["arch"] == ("llama" if family == "mistral" else family)
    assert record["parameters"] == sum(p.numel() for p in model.parameters())
    prompts = steady_prompts(model)
    with LlamaCpp(record["path"], n_ctx=64) as llama:
        for prompt, expected in prompts:
            assert llama.greedy(prompt, len(expected)) == expected
        if quant == "f32":  # llama.cpp keeps its KV cache in f16: that is the remaining error
            ids = prompts[0][0] + prompts[0][1]
            with torch.no_grad():
                expected = model(torch.tensor([ids])).logits[0].numpy()
            assert relative_error(llama.logits(ids), expected) < 1e-3


@pytest.mark.parametrize(
    "settings",
    [{"attention_bias": True}, {"mlp_bias": True}, {"rope_parameters": LINEAR_ROPE}],
    ids=["attention-bias", "mlp-bias", "linear-rope"],
)
def test_llama_variants_compute_as_pytorch_does(settings, tokenizer, llama_cpp, tmp_path) -> None:
    """Biases (q/k ones permuted like their weights) and linear RoPE scaling reach llama.cpp."""
    model = tiny_causal_lm("llama", **settings)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0, 0.5)
    ids = list(range(3, 40))
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    with LlamaCpp(export_gguf(model, tokenizer, tmp_path / "model.gguf", "f32")["path"], n_ctx=64) as llama:
        assert relative_error(llama.logits(ids), expected) < 2e-3


def dequantized(model: PreTrainedModel, path: Path) -> PreTrainedModel:
    """``model`` with the weights the Llama file at ``path`` holds, de-quantized and put back in HF's layout."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    stored = {tensor.name: tensor for tensor in gguf.GGUFReader(path).tensors}
    heads = {"q_proj": model.config.num_attention_heads, "k_proj": model.config.num_key_value_heads}
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in copied.named_parameters():
            tensor = stored[names.get_name(name, try_suffixes=(".weight", ".bias"))]
            weight = torch.tensor(gguf.quants.dequantize(tensor.data, tensor.tensor_type)).reshape(parameter.shape)
            for projection, count in heads.items():
                if projection in name:  # adjacent RoPE pairs back to HF's halves
                    weight = weight.reshape(count, -1, 2, weight.shape[1]).transpose(1, 2).reshape(parameter.shape)
            parameter.copy_(weight)
    return copied


@pytest.mark.parametrize(
    ("quant", "expected"),
    [
        ("q8_0", {"Q8_0": 29, "F32": 9}),
        ("q4_1", {"Q6_K": 1, "Q4_1": 28, "F32": 9}),
        ("q4_k_m", {"Q6_K": 5, "Q4_K": 24, "F32": 9}),  # token_embd, and attn_v/ffn_down of blocks 2 and 3
    ],
)
def test_quantized_files_compute_with_the_weights_they_hold(quant, expected, tokenizer, llama_cpp, tmp_path) -> None:
    """A 256-wide tied Llama, so that the K-quants apply: llama.cpp's logits are those of the file's weights,
    de-quantized back into PyTorch (up to llama.cpp's 8-bit activations), far from those of the original."""
    model = tiny_causal_lm("llama", hidden_size=256, intermediate_size=512, head_dim=64, tie_word_embeddings=True)
    record = export_gguf(model, tokenizer, tmp_path / "model.gguf", quant)
    assert record["tensor_types"] == expected
    ids = tokenizer("the king sang of the hills and the river")["input_ids"]
    with torch.no_grad():
        reference = dequantized(model, tmp_path / "model.gguf")(torch.tensor([ids])).logits[0].numpy()
    with LlamaCpp(record["path"], n_ctx=64) as llama:
        assert relative_error(llama.logits(ids), reference) < 0.05
        assert all(0 <= token < VOCAB for token in llama.greedy(ids, 16))


@pytest.mark.parametrize("tied", [True, False])
def test_q4_1_types_follow_llama_quantize(tied, tokenizer, tmp_path) -> None:
    """Width 64: the output matrix wants Q6_K, whose 256-blocks do not divide 64, so it falls back to Q8_0."""
    model = tiny_causal_lm("llama", hidden_size=64, intermediate_size=128, head_dim=16, tie_word_embeddings=tied)
    found = types(Path(export_gguf(model, tokenizer, tmp_path / "model.gguf", "q4_1")["path"]))
    assert found.pop("token_embd.weight") == ("Q8_0" if tied else "Q4_1")
    assert found.pop("output.weight", None) == (None if tied else "Q8_0")
    assert {name: kind for name, kind in found.items() if kind != "Q4_1"} == {
        name: "F32" for name in found if name.endswith("norm.weight")
    }


@pytest.mark.slow  # GGUFReader takes ~3 s over the 49152-token vocabulary
def test_types_match_the_shipped_smollm2_q4_1_file(smollm2_gguf) -> None:
    tensors = gguf.GGUFReader(smollm2_gguf).tensors
    for tensor in tensors:
        shape = tuple(int(size) for size in reversed(tensor.shape))  # GGUF lists the row length first
        assert tensor_type(tensor.name, shape, preset("q4_1"), 30, tied=True) == tensor.tensor_type, tensor.name
    assert len(tensors) == 272


def test_k_quant_mixes_of_a_smollm2_shaped_model() -> None:
    """30 blocks of width 576 (not a multiple of 256) and ffn 1536 (one): fallbacks and llama.cpp's extra bits."""

    def kind(name: str, shape: tuple[int, int], quant: str) -> str:
        return tensor_type(name, shape, preset(quant), 30, tied=True).name

    more_bits = [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert [i for i in range(30) if kind(f"blk.{i}.ffn_down.weight", (576, 1536), "q4_k_m") == "Q6_K"] == more_bits
    assert {kind(f"blk.{i}.ffn_down.weight", (576, 1536), "q4_k_m") for i in (3, 4, 6)} == {"Q4_K"}
    assert kind("blk.0.attn_v.weight", (192, 576), "q4_k_m") == "Q8_0"  # Q6_K falls back
    assert kind("blk.3.attn_v.weight", (192, 576), "q4_k_m") == "Q5_0"  # Q4_K falls back
    assert kind("blk.3.attn_q.weight", (576, 576), "q5_k_m") == "Q5_1"  # Q5_K falls back
    assert kind("token_embd.weight", (49152, 576), "q8_0") == kind("token_embd.weight", (49152, 576), "q6_k") == "Q8_0"
    assert kind("blk.0.attn_norm.weight", (576,), "q4_k_m") == "F32"
    assert kind("blk.0.attn_q.weight", (48, 48), "q4_0") == "F16"  # no 32-block divides a row of 48


def test_ggml_quantizer_is_llama_cpps(llama_cpp) -> None:
    """Q8_0 from ggml's C quantizer is byte for byte the gguf package's; K-quants de-quantize close to the input."""
    matrix = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32)
    assert (quantize_rows(matrix, T.Q8_0) == gguf.quants.quantize(matrix, T.Q8_0)).all()
    for qtype, bound in ((T.Q4_K, 0.25), (T.Q5_K, 0.12), (T.Q6_K, 0.07)):
        packed = quantize_rows(matrix, qtype)
        assert packed.shape == (8, 512 // 256 * gguf.GGML_QUANT_SIZES[qtype][1])
        assert np.abs(gguf.quants.dequantize(packed, qtype) - matrix).max() < bound


def test_metadata(tokenizer, tmp_path) -> None:
    model = tiny_causal_lm("qwen3", rms_norm_eps=1e-5)
    export_gguf(model, tokenizer, tmp_path / "student.gguf", "f16")
    found = fields(tmp_path / "student.gguf")
    assert found["general.architecture"] == "qwen3" and found["general.name"] == "student"
    assert {key.removeprefix("qwen3."): found[key] for key in found if key.startswith("qwen3.")} == pytest.approx({
        "context_length": 128, "embedding_length": 48, "block_count": 4, "feed_forward_length": 96,
        "attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": 8,
        "attention.value_length": 8, "rope.dimension_count": 8, "rope.freq_base": 10000.0,
        "attention.layer_norm_rms_epsilon": 1e-5, "vocab_size": VOCAB,
    })  # fmt: skip
    assert found["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert found["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    assert found["tokenizer.ggml.pre"] == "smollm" and found["tokenizer.ggml.model"] == "gpt2"
    assert (found["tokenizer.ggml.bos_token_id"], found["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert found["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]  # specials are control tokens
    export_gguf(tiny_causal_lm("mistral"), tokenizer, tmp_path / "windowed.gguf", "f16")
    assert fields(tmp_path / "windowed.gguf")["llama.context_length"] == 6  # full attention up to the window


TEXTS = [
    "Line 12 of the song of king 3, and the hills sing 1834.",
    "The river runs on;  a quiet wind\n\nmoves by the old mill(year 1821)!",
    "<|im_start|>the hills<|im_end|>",
]


@pytest.fixture(scope="module")
def variants() -> dict[str, PreTrainedTokenizerFast]:
    return {name: byte_level_tokenizer(pre_tokenizer) for name, pre_tokenizer in PRE_TOKENIZERS.items()}


@pytest.mark.parametrize("name", PRE_TOKENIZERS)
def test_llama_cpp_tokenizes_as_the_tokenizer_does(name, variants, llama_cpp, tmp_path) -> None:
    """Each known pre-tokenizer gets llama.cpp's equivalent, so the file tokenizes like the Hugging Face
    tokenizer; the texts tell every pair of them apart (digits, "(year", spaces), so a wrong name would fail."""
    tokenizer = variants[name]

    def ids(variant: PreTrainedTokenizerFast) -> list[list[int]]:
        return [variant(text)["input_ids"] for text in TEXTS]

    assert all(ids(variants[other]) != ids(tokenizer) for other in set(variants) - {name})
    record = export_gguf(tiny_causal_lm("llama"), tokenizer, tmp_path / "model.gguf", "f16")
    assert record["pre_tokenizer"] == name
    with LlamaCpp(record["path"], n_ctx=64) as llama:
        for text in TEXTS:
            assert llama.tokenize(text) == tokenizer(text)["input_ids"], text


@pytest.mark.slow  # GGUFReader takes ~3 s over the 49152-token vocabulary
def test_smollm2_tokenizer_travels_whole(smollm2_gguf, llama_cpp, tmp_path) -> None:
    """The real tokenizer: its vocabulary, merges and special tokens are the shipped file's, and llama.cpp
    tokenizes as it does. The tokenizer distill loads is the one transformers rebuilds from that file, whose
    pre-tokenizer is plain GPT-2 byte-level (no digit splitting): the export says gpt-2, true to it."""
    tokenizer = load_tokenizer(str(smollm2_gguf))
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=32, head_dim=8, tie_word_embeddings=True)
    record = export_gguf(model, tokenizer, tmp_path / "model.gguf", "q8_0")
    assert record["pre_tokenizer"] == "gpt-2"
    written, shipped = fields(tmp_path / "model.gguf"), fields(smollm2_gguf)
    for key in ("tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "unknown_token_id",
                "padding_token_id", "add_bos_token"):  # fmt: skip
        assert written[f"tokenizer.ggml.{key}"] == shipped[f"tokenizer.ggml.{key}"], key
    assert written["tokenizer.chat_template"] == shipped["tokenizer.chat_template"]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Count: 1, 22, 333 ü ß 😀"}], tokenize=False)
    with LlamaCpp(record["path"], n_ctx=128) as llama:
        for text in [*TEXTS, chat, "  leading spaces\tand tabs", "I've been 'told he's there"]:
            assert llama.tokenize(text) == tokenizer(text)["input_ids"], text


def one_line_error(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_unsupported_architectures_are_one_line(tokenizer, tmp_path) -> None:
    with pytest.raises(UnsupportedGGUFArchitecture) as known:
        export_gguf(tiny_causal_lm("gpt2"), tokenizer, tmp_path / "model.gguf", "f16")
    expected = "llama.cpp knows 'gpt2' but distill's GGUF export maps only llama, mistral, qwen2, qwen3"
    assert one_line_error(known) == expected
    model = tiny_causal_lm("llama")
    model.config.model_type = "made_up_lm"
    with pytest.raises(UnsupportedGGUFArchitecture) as unknown:
        export_gguf(model, tokenizer, tmp_path / "model.gguf", "f16")
    assert one_line_error(unknown) == "llama.cpp has no architecture for model_type 'made_up_lm'"
    assert isinstance(unknown.value, ValueError) and not (tmp_path / "model.gguf").exists()


def test_bad_input_is_one_line(tokenizer, tmp_path) -> None:
    path = tmp_path / "model.gguf"
    with pytest.raises(ValueError) as preset_error:
        export_gguf(tiny_causal_lm("llama"), tokenizer, path, "q3_k_s")
    assert "'q3_k_s'" in one_line_error(preset_error) and "q4_0, q4_1, q5_0, q5_1, q4_k_m" in str(preset_error.value)
    extra = tiny_causal_lm("llama")
    extra.model.layers[1].gate_bias = torch.nn.Parameter(torch.zeros(48))
    with pytest.raises(ValueError, match=r"parameter\(s\) model\.layers\.1\.gate_bias$") as unplaced:
        export_gguf(extra, tokenizer, path, "f16")
    one_line_error(unplaced)
    scaled = tiny_causal_lm("llama")
    scaled.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="rope_scaling 'dynamic'") as rope:
        export_gguf(scaled, tokenizer, path, "f16")
    one_line_error(rope)
    with pytest.raises(ValueError, match="qwen2 architecture sizes attention") as qwen2:
        export_gguf(tiny_causal_lm("qwen2"), tokenizer, path, "f16")
    one_line_error(qwen2)


def test_tokenizers_without_a_known_byte_level_pre_tokenizer_are_refused(tmp_path) -> None:
    model, path = tiny_causal_lm("llama"), tmp_path / "model.gguf"
    spaced = byte_level_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=True))
    with pytest.raises(ValueError, match=r"unknown byte-level pre-tokenizer byte-level\+gpt2-regex\+prefix-space") as e:
        export_gguf(model, spaced, path, "f16")
    assert "pre_tokenizer=" in one_line_error(e)
    assert export_gguf(model, spaced, path, "f16", pre_tokenizer="gpt-2")["pre_tokenizer"] == "gpt-2"
    sentencepiece_like = byte_level_tokenizer(pre_tokenizers.Metaspace())
    with pytest.raises(ValueError, match="byte-level BPE vocabularies only") as not_byte_level:
        export_gguf(model, sentencepiece_like, path, "f16")
    one_line_error(not_byte_level)


def test_without_llama_cpp_k_quants_fail_in_one_line_and_the_rest_work(tokenizer, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(gguf_export, "runtime_available", lambda: False)
    model = tiny_causal_lm("llama", hidden_size=256, intermediate_size=512, head_dim=64, tie_word_embeddings=True)
    with pytest.raises(RuntimeError) as missing:
        export_gguf(model, tokenizer, tmp_path / "model.gguf", "q4_k_m")
    assert one_line_error(missing) == MISSING_RUNTIME == "llama.cpp runtime not installed: pip install 'distill[gguf]'"
    # The tied head would be Q6_K (ggml's quantizer): without it, Q8_0.
    assert export_gguf(model, tokenizer, tmp_path / "model.gguf", "q4_1")["tensor_types"] == {
        "Q8_0": 1, "Q4_1": 28, "F32": 9
    }  # fmt: skip


@pytest.mark.slow  # loads and writes the 135M-parameter teacher (~15 s)
def test_re_exporting_the_shipped_smollm2_reproduces_its_tensors(smollm2_gguf, llama_cpp, tmp_path) -> None:
    """The teacher as distill loads it (de-quantized by transformers, q/k back in HF's order), exported at q4_1:
    every tensor is byte for byte the shipped file's, and llama.cpp continues a chat prompt identically."""
    tokenizer, model = load_tokenizer(str(smollm2_gguf)), load_causal_lm(str(smollm2_gguf))
    record = export_gguf(model, tokenizer, tmp_path / "smollm2.gguf", "q4_1")
    ours = {tensor.name: tensor for tensor in gguf.GGUFReader(record["path"]).tensors}
    shipped = {tensor.name: tensor for tensor in gguf.GGUFReader(smollm2_gguf).tensors}
    assert ours.keys() == shipped.keys()
    for name, tensor in shipped.items():
        assert ours[name].tensor_type == tensor.tensor_type and np.array_equal(ours[name].data, tensor.data), name
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=False)  # fmt: skip
    ids = tokenizer(prompt)["input_ids"]
    with LlamaCpp(smollm2_gguf, n_ctx=128) as teacher, LlamaCpp(record["path"], n_ctx=128) as exported:
        assert exported.greedy(ids, 16) == teacher.greedy(ids, 16)
