"""`python -m distill.export_gguf`: a run's student as GGUF files beside it, each checked in llama.cpp."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from distill.architectures.linears import block_linear_names, linear_weight
from distill.export_gguf import export
from distill.kernels.sparsity import nm_mask
from distill.serve.gguf_export import export_gguf
from distill.serve.llamacpp import LlamaCpp
from tests.model_families import tiny_causal_lm
from tests.test_gguf_export import CORPUS, PRE_TOKENIZERS, byte_level_tokenizer


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run folder whose student is a tiny random Llama with a byte-level BPE tokenizer."""
    student = tmp_path / "run" / "student"
    tiny_causal_lm("llama").save_pretrained(student)
    byte_level_tokenizer(PRE_TOKENIZERS["gpt-2"]).save_pretrained(student)
    return student.parent


@pytest.fixture
def works(tmp_path: Path) -> Path:
    folder = tmp_path / "works"
    folder.mkdir()
    for work in range(4):
        (folder / f"work_{work}.txt").write_text("".join(CORPUS[work * 40 : work * 40 + 40]))
    return folder


def overrides(run: Path, works: Path, tmp_path: Path) -> list[str]:
    return [
        f"model={run / 'student'}",
        f"paths.output_dir={tmp_path / 'export'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"data.data_dir={works}",
        "data.pattern=*.txt",
        "data.val_files=[work_2.txt]",
        "data.test_files=[work_3.txt]",
        "data.block_size=32",
        "perplexity_blocks=3",
        "prompts=2",
        "prompt_tokens=6",
        "new_tokens=8",
        "threads=1",
    ]


def test_files_land_beside_the_student_and_each_is_scored_in_llama_cpp(compose_train, run, works, tmp_path) -> None:
    report = export(compose_train(*overrides(run, works, tmp_path), "quant=[f32,q8_0]", config_name="export_gguf"))
    assert sorted(path.name for path in (run / "student_gguf").iterdir()) == ["student-f32.gguf", "student-q8_0.gguf"]
    checks = report["checks"]
    assert checks["perplexity_blocks"] == 3 and checks["torch_perplexity"] > 1
    # f32 in llama.cpp is PyTorch up to float order (and its f16 KV cache); q8_0 rounds every weight.
    assert checks["f32"]["perplexity_vs_torch"] == pytest.approx(1, abs=2e-3)
    assert checks["q8_0"]["perplexity_vs_torch"] == pytest.approx(1, abs=0.05)
    assert checks["f32"]["tokenizer_equal"] and checks["q8_0"]["tokenizer_equal"]
    assert len(checks["f32"]["greedy"]) == 2 and "greedy" not in checks["q8_0"]
    for row in checks["f32"]["greedy"]:  # a divergence is only allowed at a near tie of PyTorch's top two
        assert row["equal"] or row["torch_top2_gap_there"] < 1e-2
    saved = json.loads((tmp_path / "export" / "export_gguf.json").read_text())
    assert saved["files"]["q8_0"]["file_bytes"] == (run / "student_gguf" / "student-q8_0.gguf").stat().st_size
    assert saved["git"]


def test_an_unknown_preset_is_named_before_any_file_is_written(compose_train, run, works, tmp_path) -> None:
    presets = ("quant=[q4_1,q3_xs]", "check=false")
    cfg = compose_train(*overrides(run, works, tmp_path), *presets, config_name="export_gguf")
    with pytest.raises(ValueError, match="q3_xs"):
        export(cfg)
    assert not (run / "student_gguf").exists()


def test_a_2_4_student_exports_with_its_zeros_and_llama_cpp_computes_with_them(tmp_path: Path) -> None:
    """Held one-shot masks are exact zeros in student/: the file keeps every one (llama.cpp has no sparse format on
    CPU, bench/gguf_24.py measures that it gains no speed) and llama.cpp computes the masked model."""
    model = tiny_causal_lm("llama")
    with torch.no_grad():
        for name in block_linear_names(model):
            weight = linear_weight(model.get_submodule(name))
            weight.mul_(nm_mask(weight, 2, 4).to(weight.dtype))
    record = export_gguf(model, byte_level_tokenizer(PRE_TOKENIZERS["gpt-2"]), tmp_path / "sparse.gguf", "f32")
    stored = {tensor.name: np.asarray(tensor.data) for tensor in gguf.GGUFReader(record["path"]).tensors}
    gate = stored["blk.0.ffn_gate.weight"]
    assert gate.shape == (96, 48) and (gate.reshape(-1, 4) == 0).sum(axis=1).min() >= 2
    ids = [5, 17, 33, 8, 60, 41, 12]
    with LlamaCpp(record["path"], n_ctx=32) as llama, torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
        assert np.abs(llama.logits(ids) - expected).max() < 1e-3 * np.abs(expected).max()
