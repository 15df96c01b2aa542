"""llama.cpp's runtime through distill.serve.llamacpp: the shipped SmolLM2 Q4_1 file against its PyTorch copy."""

from __future__ import annotations

import builtins
import math
from pathlib import Path

import numpy as np
import pytest

from distill.serve import llamacpp
from distill.serve.gguf_checks import torch_perplexity, unpadded_windows
from distill.serve.llamacpp import LlamaCpp, MissingRuntime, block_nll, perplexity
from distill.utils.references import load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def macbeth(data_dir: Path) -> str:
    return (data_dir / "shakespeare" / "macbeth_gut.txt").read_text()[5000:9000]


def test_llama_cpp_tokenizes_held_out_text_as_the_hugging_face_tokenizer(smollm2_gguf: Path, macbeth: str) -> None:
    tokenizer = load_tokenizer(str(smollm2_gguf))
    with LlamaCpp(smollm2_gguf) as model:
        assert model.tokenize(macbeth) == tokenizer(macbeth)["input_ids"]
        assert model.vocab_size == len(tokenizer)


def test_logits_are_per_position_and_each_call_starts_from_an_empty_cache(smollm2_gguf: Path) -> None:
    ids = [2068, 325, 28, 355, 441, 288, 325, 28]
    with LlamaCpp(smollm2_gguf, n_ctx=64) as model:
        whole = model.logits(ids)
        prefix = model.logits(ids[:4])
        again = model.logits(ids)
        continuation = model.greedy(ids[:4], 3)
    assert whole.shape == (8, 49152) and np.isfinite(whole).all()
    # Causal: the first positions do not see the rest (llama.cpp batches differently: float order only).
    np.testing.assert_allclose(prefix, whole[:4], atol=2e-2)
    np.testing.assert_array_equal(again, whole)
    assert continuation[0] == int(np.argmax(prefix[-1]))


@pytest.mark.slow
def test_held_out_perplexity_in_llama_cpp_matches_the_pytorch_copy(smollm2_gguf: Path, macbeth: str) -> None:
    """The Q4_1 file in llama.cpp and its de-quantized PyTorch copy score the same windows within 1 %: llama.cpp
    rounds activations to 8 bits in its Q4_1 products, PyTorch multiplies in fp32."""
    tokenizer, model = load_tokenizer(str(smollm2_gguf)), load_causal_lm(str(smollm2_gguf))
    ids = tokenizer(macbeth)["input_ids"]
    blocks = [ids[:256], ids[256:512]]
    assert perplexity(smollm2_gguf, blocks) == pytest.approx(torch_perplexity(model, blocks), rel=0.01)


def test_block_nll_counts_every_position_but_the_last() -> None:
    logits = np.zeros((4, 5), dtype=np.float32)
    nll, tokens = block_nll(logits, [0, 1, 2, 3])
    assert tokens == 3 and nll == pytest.approx(3 * math.log(5))


def test_windows_drop_padding_and_stop_at_the_limit() -> None:
    batch = {"input_ids": np.array([[5, 6, 7], [8, 9, 0]]), "attention_mask": np.array([[1, 1, 1], [1, 1, 0]])}
    assert unpadded_windows([batch, batch]) == [[5, 6, 7], [8, 9], [5, 6, 7], [8, 9]]
    assert unpadded_windows([batch, batch], limit=3) == [[5, 6, 7], [8, 9], [5, 6, 7]]


def test_bad_input_is_named(smollm2_gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf"):
        LlamaCpp(tmp_path / "missing.gguf")
    not_a_model = tmp_path / "broken.gguf"
    not_a_model.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ValueError, match=r"broken\.gguf. is truncated or corrupt"):
        LlamaCpp(not_a_model)
    with LlamaCpp(smollm2_gguf, n_ctx=16) as model, pytest.raises(ValueError, match="exceeds n_ctx=16"):
        model.greedy(list(range(10, 20)), 8)
    with pytest.raises(ValueError, match="at least one block"):
        perplexity(smollm2_gguf, [[1]])


def test_a_missing_or_other_runtime_is_one_line_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_xllamacpp(name: str, *args, **kwargs):
        if name == "xllamacpp":
            raise ImportError("No module named 'xllamacpp'")
        return real_import(name, *args, **kwargs)

    llamacpp.runtime.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_xllamacpp)
    with pytest.raises(MissingRuntime, match=r"^llama.cpp runtime not installed .*pip install 'distill\[gguf\]'$"):
        llamacpp.runtime()
    monkeypatch.setattr(builtins, "__import__", real_import)
    monkeypatch.setattr(llamacpp.importlib.metadata, "version", lambda name: "2025.1.1")
    with pytest.raises(MissingRuntime, match=r"xllamacpp 2025\.1\.1 is installed"):
        llamacpp.runtime()
    llamacpp.runtime.cache_clear()
