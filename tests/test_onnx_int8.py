"""The ONNX Runtime export: fp32 parity, int8 = QAT's fake quantization, only the QAT layers quantized."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import onnx
import pytest
import torch

from distill.callbacks.qat import fake_quantize
from distill.pipeline.export import float_student
from distill.serve.first_token import FirstTokenClassifier, reads_first_token
from distill.serve.onnx_int8 import OnnxModel, export_onnx, gemms_as_matmuls, matmuls_with_weights, save_int8
from tests.callback_helpers import tiny_bert
from tests.conftest import tiny_llama


class NoTokenizer:
    def save_pretrained(self, directory: Path) -> None:
        (Path(directory) / "tokenizer.json").write_text("{}")


def token_batch(rows: int, length: int, seed: int, vocab: int = 50) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    batch = {
        "input_ids": torch.randint(1, vocab, (rows, length), generator=generator),
        "attention_mask": torch.ones(rows, length, dtype=torch.long),
    }
    batch["attention_mask"][-1, length // 2 :] = 0  # right padding in the last row
    return batch


def encoder_linears(model: torch.nn.Module) -> list[str]:
    return [
        name
        for name, module in model.named_modules()
        if ".encoder.layer." in f".{name}" and isinstance(module, torch.nn.Linear)
    ]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


@pytest.mark.parametrize(
    "model_factory",
    [lambda: tiny_bert(0, hidden=32), pytest.param(lambda: tiny_llama(50), marks=pytest.mark.slow)],
    ids=["bert", "llama"],
)
def test_fp32_graph_equals_the_model_at_other_shapes(model_factory, tmp_path: Path) -> None:
    model = model_factory().eval()
    session = OnnxModel(export_onnx(model, token_batch(2, 6, seed=0), tmp_path / "fp32.onnx"))
    for rows, length in ((1, 3), (5, 11)):
        batch = token_batch(rows, length, seed=rows)
        with torch.no_grad():
            expected = model(**batch).logits
        assert relative_error(session(**batch).logits, expected) < 1e-5


@pytest.mark.slow
def test_first_token_graph_runs_the_last_layer_for_the_head_only(tmp_path: Path) -> None:
    """A BERT classifier's last layer computes position 0 alone: the same logits as the model and as the plain
    graph, padding included, and the last layer's feed-forward sees one position whatever the length."""
    model = tiny_bert(0, layers=3, hidden=32).eval()
    assert reads_first_token(model) and not reads_first_token(tiny_llama(50))
    example = token_batch(2, 6, seed=0)
    first, plain = (OnnxModel(export_onnx(model, example, tmp_path / f"{flag}.onnx", flag)) for flag in (True, False))
    seen = []
    hook = model.bert.encoder.layer[-1].intermediate.register_forward_hook(lambda *args: seen.append(args[2].shape))
    for rows, length in ((1, 3), (5, 11)):
        batch = token_batch(rows, length, seed=rows)
        with torch.no_grad():
            expected = model(**batch).logits
            wrapped = FirstTokenClassifier(model, list(batch))(*batch.values())
        assert relative_error(wrapped, expected) < 1e-6
        assert relative_error(first(**batch).logits, expected) < 1e-5
        assert relative_error(plain(**batch).logits, expected) < 1e-5
    hook.remove()
    assert [shape[1] for shape in seen] == [3, 1, 11, 1]  # the model's own forward, then the wrapper's


@pytest.mark.parametrize("first_token_only", [True, False])
def test_exporting_leaves_the_model_in_eval_mode(first_token_only: bool, tmp_path: Path) -> None:
    """The exporter restores its wrapper's mode to the model: a training wrapper would switch dropout on."""
    model = tiny_bert(0, hidden=32)
    model.config.hidden_dropout_prob = 0.5
    model = type(model)(model.config).eval()
    batch = token_batch(2, 6, seed=0)
    with torch.no_grad():
        before = model(**batch).logits
        export_onnx(model, batch, tmp_path / "fp32.onnx", first_token_only)
        after = model(**batch).logits
    assert not any(module.training for module in model.modules())
    assert torch.equal(before, after)


def test_the_graph_masks_padding_once_and_the_model_keeps_its_attention(tmp_path: Path) -> None:
    """The padding mask is built once and added in every layer: no per-layer Where (SDPA's export)."""
    wheres = []
    for layers in (2, 4):
        model = tiny_bert(0, layers=layers, hidden=32).eval()
        model.set_attn_implementation("sdpa")
        path = export_onnx(model, token_batch(2, 6, seed=0), tmp_path / f"{layers}.onnx")
        wheres.append(sum(node.op_type == "Where" for node in onnx.load(str(path)).graph.node))
        assert model.config._attn_implementation == "sdpa"
    assert wheres[0] == wheres[1]


def int8_export(model: torch.nn.Module, layers: list[str], output_dir: Path, first_token_only: bool = True) -> Path:
    export = partial(export_onnx, model, token_batch(2, 6, seed=0), first_token_only=first_token_only)
    return save_int8(model, layers, NoTokenizer(), output_dir, export)


def qat_bert(seed: int = 0) -> tuple[torch.nn.Module, list[str]]:
    model = tiny_bert(seed, hidden=32).eval()
    with torch.no_grad():  # weights of a trained scale, so that int8 rounding is visible in the logits
        for parameter in model.parameters():
            parameter.mul_(8)
    names = encoder_linears(model)
    fake_quantize(model, names)
    return model, names


@pytest.mark.parametrize("arithmetic", ["auto", "u8u8"])
@pytest.mark.parametrize("first_token_only", [False, True])
def test_int8_model_computes_what_qat_simulated(first_token_only: bool, arithmetic: str, tmp_path, monkeypatch) -> None:
    """Dynamic int8 scales each activation by its own range, so the first-token graph's last layer (fewer
    rows) matches the fake-quantized model run through the same wrapper, and the plain graph the model.
    ``auto`` is this CPU's exact arithmetic (distill.serve.int8_arithmetic); u8u8 is exact on every CPU."""
    monkeypatch.setenv("DISTILL_ORT_INT8", arithmetic)
    fake_quantized, names = qat_bert()
    plain = float_student(fake_quantized)
    served = OnnxModel(int8_export(plain, names, tmp_path / "int8", first_token_only))
    for rows, length in ((1, 5), (4, 9)):
        batch = token_batch(rows, length, seed=10 + rows)
        with torch.no_grad():
            if first_token_only:
                simulated = FirstTokenClassifier(fake_quantized, list(batch))(*batch.values())
            else:
                simulated = fake_quantized(**batch).logits
            unquantized = plain(**batch).logits
        deployed = served(**batch).logits
        # int8 rounding moves the logits; the deployed model moves them exactly as fit saw them
        assert relative_error(deployed, simulated) < 1e-5 < 1e-3 < relative_error(deployed, unquantized)


def test_only_the_qat_layers_are_quantized(tmp_path: Path) -> None:
    fake_quantized, names = qat_bert()
    chosen = names[:5]
    out = int8_export(float_student(fake_quantized), chosen, tmp_path / "q")
    graph = onnx.load(str(out / "model.onnx")).graph
    assert sum(node.op_type == "MatMulInteger" for node in graph.node) == 5
    record = json.loads((out / "quantization.json").read_text())
    assert record["layers"] == chosen and len(record["nodes"]) == 5
    assert {"config.json", "tokenizer.json", "model.onnx"} <= {path.name for path in out.iterdir()}
    assert not (out / "fp32.onnx").exists()


def test_a_weight_missing_from_the_graph_is_named(tmp_path: Path) -> None:
    model = tiny_bert(0, hidden=32).eval()
    path = export_onnx(model, token_batch(2, 6, seed=0), tmp_path / "fp32.onnx")
    stranger = torch.randn(32, 32)
    with pytest.raises(ValueError, match=r"weights \[1\] \(by position\) are not a MatMul operand"):
        matmuls_with_weights(path, [model.bert.encoder.layer[0].attention.self.query.weight, stranger])


def test_serving_errors_name_the_file_and_the_inputs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no ONNX model at"):
        OnnxModel(tmp_path)
    session = OnnxModel(export_onnx(tiny_bert(0).eval(), token_batch(2, 6, seed=0), tmp_path / "fp32.onnx"))
    with pytest.raises(KeyError, match=r"needs inputs \['attention_mask'\]"):
        session(input_ids=torch.ones(1, 4, dtype=torch.long))


def test_only_targeted_gemms_become_matmuls_and_leave_no_stale_weight(tmp_path: Path) -> None:
    """A 2-D Linear exports as Gemm (transB=1): the targeted one becomes MatMul + Add over its transposed weight,
    which replaces the original initializer; an untargeted head stays a Gemm. The function is unchanged."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    path, x = tmp_path / "model.onnx", torch.randn(3, 8)
    torch.onnx.export(model, (x,), str(path), input_names=["x"], opset_version=17, dynamo=False)
    before = onnx.load(str(path)).graph
    gemms_as_matmuls(path, [model[0].weight])
    graph = onnx.load(str(path)).graph
    assert [node.op_type for node in graph.node] == ["MatMul", "Add", "Relu", "Gemm"]
    assert len(graph.initializer) == len(before.initializer)
    assert sum(tensor.name.endswith("_transposed") for tensor in graph.initializer) == 1
    with torch.no_grad():
        torch.testing.assert_close(OnnxModel(path).session.run(None, {"x": x.numpy()})[0], model(x).numpy())
