"""Whole runs (``train()``) of causal LMs of families other than Llama: a width-pruned student, a
pretrained student of another family than its teacher, and the early refusal of a cut no layout supports."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

import distill.tasks.causal_lm
import distill.train
from distill.architectures import layouts
from distill.models.student import check_student
from distill.pruning.structured import decoder_layer_params
from distill.tasks.causal_lm import perplexity
from distill.train import train
from tests.model_families import tiny_causal_lm
from tests.test_causal_lm import text_module, tiny_run


def save_family(family: str, tokenizer_dir: Path, path: Path, **overrides) -> Path:
    """A tiny random ``family`` model sized to the tokenizer in ``tokenizer_dir``, saved with it in ``path``."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tiny_causal_lm(family, vocab_size=len(tokenizer), **overrides).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def family_run(compose_train, teacher: Path, corpus: Path, tmp_path: Path, *overrides: str):
    """experiment=smollm2_to_small shortened to seconds (tests/test_causal_lm.py's ``tiny_run``) with
    ``overrides`` in place of its student settings."""
    kept = [item for item in tiny_run(teacher, corpus) if not item.startswith("student.")]
    return compose_train(
        "experiment=smollm2_to_small",
        "debug=smoke",
        f"paths.output_dir={tmp_path / 'run'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        *kept,
        *overrides,
    )


def check_export(run: Path, corpus: Path, tmp_path: Path, metrics: dict, limit: int) -> PreTrainedModel:
    """The exported student reloads as a Hugging Face model whose held-out perplexity is the run's."""
    reloaded = AutoModelForCausalLM.from_pretrained(run / "student")
    data = text_module(corpus, str(run / "student"), tmp_path / "cache", test_limit_blocks=limit)
    assert perplexity(reloaded, data.test_dataloader()) == pytest.approx(metrics["student/test_ppl"], rel=1e-4)
    return reloaded


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3", "gpt2"])
def test_width_pruned_student_of_another_family_runs_end_to_end(
    family: str,
    compose_train,
    lm_teacher_dir: Path,
    corpus: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Prune to a parameter target over depth and width, distil, test, export. Qwen3 (q/k norms) loses
    hidden width; GPT-2 (Conv1D, learned positions, head_dim from the width) can only lose depth and FFN."""
    teacher_dir = save_family(family, lm_teacher_dir, tmp_path / f"{family}_teacher")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    # Half the decoder layers' parameters fewer: the embedding tables are most of a tiny model with a
    # 30k vocabulary, so a family that can cut hidden channels reaches the target through them.
    target = teacher.num_parameters() - decoder_layer_params(teacher) // 2
    cfg = family_run(
        compose_train,
        teacher_dir,
        corpus,
        tmp_path,
        f"student.target_params={target}",
        "student.axes=[depth,width]",
    )
    with caplog.at_level(logging.WARNING, logger="distill.pruning.shape"):
        metrics = train(cfg)
    run = tmp_path / "run"
    report = json.loads((run / "pruning.json").read_text())
    before, after = report["teacher_shape"], report["student_shape"]
    assert report["params"]["student_total"] <= target
    if family == "gpt2":
        assert after["hidden_size"] == before["hidden_size"]
        assert after["num_layers"] < before["num_layers"] or after["intermediate_size"] < before["intermediate_size"]
        assert "shrinking ['depth', 'ffn'] only" in caplog.text
    else:
        assert after["hidden_size"] < before["hidden_size"]
    reloaded = check_export(run, corpus, tmp_path, metrics, cfg.data.test_limit_blocks)
    assert type(reloaded) is type(teacher)
    assert reloaded.num_parameters() == report["params"]["student_total"]
    assert reloaded.config.num_hidden_layers == after["num_layers"]
    assert reloaded.config.hidden_size == after["hidden_size"]


@pytest.fixture
def olmo2_student_dir(lm_teacher_dir: Path, tmp_path: Path) -> Path:
    """A tiny OLMo 2 (norms after attention and MLP, q/k norms over all heads) with the tiny Llama teacher's
    tokenizer. Not Qwen2: transformers 5 loads a qwen2 (or phi3) folder's tokenizer as that family's own class
    whatever its tokenizer_config names, so the BERT vocabulary would gain <|endoftext|>."""
    return save_family("olmo2", lm_teacher_dir, tmp_path / "olmo2_student", layers=2)


@pytest.mark.slow
def test_pretrained_student_of_another_family_distils_from_stored_topk(
    compose_train,
    lm_teacher_dir: Path,
    olmo2_student_dir: Path,
    corpus: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Llama teacher and an OLMo 2 student that share one tokenizer: the stored top-K targets train the
    student through the fused head kernel, then it is tested and exported. (A student with another
    tokenizer fails before any stage: tests/test_models.py::test_mismatched_tokenizers_fail_before_any_stage.)"""
    fused_calls = []

    def counted(*args, **kwargs) -> torch.Tensor:
        fused_calls.append(1)
        return fused(*args, **kwargs)

    fused = distill.tasks.causal_lm.kd_loss_linear_topk
    monkeypatch.setattr(distill.tasks.causal_lm, "kd_loss_linear_topk", counted)
    cfg = family_run(
        compose_train,
        lm_teacher_dir,
        corpus,
        tmp_path,
        "student=pretrained",
        f"student.name_or_path={olmo2_student_dir}",
    )
    metrics = train(cfg)
    assert len(fused_calls) == metrics["global_step"]  # one fused loss per training step, none by logits
    assert metrics["teacher_store/bytes_per_token"] == 2 * 8 + 2 * 8 + 4
    for key in ("student/test_ppl", "teacher/test_ppl"):
        assert math.isfinite(metrics[key]), key
    reloaded = check_export(tmp_path / "run", corpus, tmp_path, metrics, cfg.data.test_limit_blocks)
    assert type(reloaded).__name__ == "Olmo2ForCausalLM" and reloaded.config.num_hidden_layers == 2


def test_width_cut_without_a_layout_is_refused_before_the_stages_after_the_teacher(
    compose_train, lm_teacher_dir: Path, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A family without a layout (here: Llama with its plans hidden) cannot be cut in width: one line naming
    the model class and the file to add a layout to, before the generation stage and the teacher-logit store."""
    monkeypatch.setattr(layouts, "plans", lambda config: None)
    stages = []
    monkeypatch.setattr(distill.train, "generation_stage", lambda *args: stages.append("generation"))
    monkeypatch.setattr(distill.train, "teacher_logit_store", lambda *args: stages.append("logit_store"))
    cfg = family_run(
        compose_train,
        lm_teacher_dir,
        corpus,
        tmp_path,
        "student.target_params=null",
        "student.shape.intermediate_size=32",
    )
    with pytest.raises(layouts.UnsupportedArchitecture) as refused:
        train(cfg)
    message = str(refused.value)
    assert "\n" not in message
    assert "LlamaForCausalLM (llama)" in message and "distill/architectures/layouts.py" in message
    assert stages == []


def test_check_student_refuses_what_the_pruned_builder_would_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a layout a family can still lose layers; a width cut of it, or a shape its config cannot
    express, is refused; other students are not the check's."""
    model = tiny_causal_lm("gpt2")
    node = OmegaConf.create({"_target_": "distill.models.student.pruned", "target_params": None, "axes": ["depth"]})
    node.shape = {"num_layers": 2}
    check_student(node, model)
    node.shape.hidden_size = 32
    with pytest.raises(ValueError, match=r"student.shape.hidden_size=32: GPT2Config derives head_dim"):
        check_student(node, model)
    monkeypatch.setattr(layouts, "plans", lambda config: None)
    node.shape = {"num_layers": 2}
    check_student(node, model)
    node.shape.intermediate_size = 64
    with pytest.raises(layouts.UnsupportedArchitecture, match=r"GPT2LMHeadModel \(gpt2\): .*layouts\.py"):
        check_student(node, model)
    check_student({"_target_": "distill.models.student.from_pretrained", "name_or_path": "unread"}, model)
