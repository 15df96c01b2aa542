"""The ONNX Runtime decoder step: whole-sequence logits, greedy decoding with a KV cache, int8 of the blocks."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import onnx
import pytest
import torch

from distill.pruning.oneshot.sequential import target_linears
from distill.serve.onnx_decoder import OnnxCausalLM, export_decoder, load_onnx
from distill.serve.onnx_int8 import OnnxModel, save_int8
from tests.conftest import tiny_llama
from tests.model_families import tiny_causal_lm
from tests.test_onnx_int8 import NoTokenizer, relative_error, token_batch


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    model = tiny_llama(50, layers=2, seed=2)
    with torch.no_grad():  # larger block weights, so that greedy decoding does not repeat one token
        for name, parameter in model.named_parameters():
            if name.startswith("model.layers.") and parameter.dim() == 2:
                parameter.mul_(5)
    return model


@pytest.fixture(scope="module")
def decoder(llama, tmp_path_factory: pytest.TempPathFactory) -> OnnxCausalLM:
    path = tmp_path_factory.mktemp("decoder") / "model.onnx"
    export_decoder(llama, path)
    return OnnxCausalLM(path)


def test_exporting_leaves_the_decoder_in_eval_mode(llama, decoder) -> None:
    assert not any(module.training for module in llama.modules())


def test_empty_past_scores_whole_padded_sequences(llama, decoder) -> None:
    batch = token_batch(3, 9, seed=4)
    with torch.no_grad():
        expected = llama(**batch).logits
    real = batch["attention_mask"].bool()
    assert relative_error(decoder(**batch).logits[real], expected[real]) < 1e-5


def test_greedy_decoding_with_the_cache_equals_transformers(llama, decoder) -> None:
    prompt = torch.randint(1, 50, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = llama.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, min_new_tokens=12)
    produced = decoder.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(produced, expected) and len(set(produced[0, 6:].tolist())) > 2


def test_the_last_cached_step_equals_a_full_forward(llama, decoder) -> None:
    ids = torch.randint(1, 50, (2, 8), generator=torch.Generator().manual_seed(6)).numpy()
    mask = torch.ones(2, 8, dtype=torch.long).numpy()
    _, *past = decoder._run(ids[:, :7], mask[:, :7], decoder._empty_past(2))
    logits = decoder._run(ids[:, 7:], mask, past)[0]
    with torch.no_grad():
        expected = llama(input_ids=torch.from_numpy(ids)).logits[:, 7:]
    assert relative_error(torch.from_numpy(logits), expected) < 1e-5


def test_int8_decoder_quantizes_the_block_linears_and_is_loaded_as_a_decoder(llama, tmp_path: Path) -> None:
    layers = target_linears(llama, None)
    out = save_int8(llama, layers, NoTokenizer(), tmp_path / "int8", partial(export_decoder, llama))
    graph = onnx.load(str(out / "model.onnx")).graph
    assert len(layers) == 14 and sum(node.op_type == "MatMulInteger" for node in graph.node) == 14
    served = load_onnx(out)
    assert isinstance(served, OnnxCausalLM)
    batch = token_batch(2, 7, seed=7)
    with torch.no_grad():
        error = relative_error(served(**batch).logits, llama(**batch).logits)
    assert 0 < error < 0.1
    assert type(load_onnx(tmp_path / "int8")) is OnnxCausalLM


def test_sampling_is_refused_and_a_plain_graph_is_not_a_decoder(decoder, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="do_sample=True"):
        decoder.generate(torch.ones(1, 3, dtype=torch.long), do_sample=True)
    from distill.serve.onnx_int8 import export_onnx
    from tests.callback_helpers import tiny_bert

    path = export_onnx(tiny_bert(0).eval(), token_batch(2, 5, seed=0), tmp_path / "plain.onnx")
    assert type(load_onnx(path)) is OnnxModel
    with pytest.raises(ValueError, match="is not a decoder-step graph"):
        OnnxCausalLM(path)


def test_layer_types_without_a_mask_in_the_graph_are_refused(tmp_path: Path) -> None:
    model = tiny_causal_lm("qwen3", layers=2)
    model.config.layer_types, model.config.attention_chunk_size = ["chunked_attention", "full_attention"], 4
    with pytest.raises(ValueError, match=r"Qwen3ForCausalLM: layer types \['chunked_attention'\] have no mask"):
        export_decoder(model, tmp_path / "model.onnx")
