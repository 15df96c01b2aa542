"""Prompt pools and teacher responses: rows, masking, errors, and the sequence-KD recipes end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.data.prompts import PromptResponseDataModule, passages
from distill.data.rows import pack_responses
from distill.data.text import IGNORE_INDEX, TextDataModule
from distill.losses.kd import kd_loss_terms
from distill.modules.on_policy import OnPolicy, OnPolicySettings
from distill.tasks import CausalLMTask
from distill.tasks.causal_lm import next_token_nll
from distill.train import train
from tests.conftest import tiny_llama
from tests.test_causal_lm import student_after_one_step


def prompt_module(poems: Path, teacher: Path, cache: Path, **overrides) -> PromptResponseDataModule:
    corpus = TextDataModule(
        str(poems), str(cache), str(teacher), val_files=["work_3.txt"], test_files=["work_4.txt"], block_size=32
    )
    settings = dict(
        instruction="Go on: {passage}",
        prompts={"train": 12, "validation": 4, "test": 4},
        passage_tokens=12,
        max_prompt_tokens=40,
        generation={"max_new_tokens": 6},
        shard_size=5,
        batch_size=4,
        eval_batch_size=4,
    )
    return PromptResponseDataModule(corpus, str(cache), **{**settings, **overrides})


def test_passages_are_runs_of_whole_lines(lm_teacher_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(lm_teacher_dir)
    found = passages("a b c\n\nd e\nf g h i\nj", tokenizer, min_tokens=4)
    assert found == ["a b c\nd e", "f g h i"]  # the short tail "j" is not a passage


@pytest.mark.slow
def test_rows_mask_the_prompt_and_hold_the_teachers_response(poems: Path, chat_teacher_dir: Path, tmp_path: Path):
    data = prompt_module(poems, chat_teacher_dir, tmp_path / "cache")
    teacher = AutoModelForCausalLM.from_pretrained(chat_teacher_dir)
    stats = data.attach_teacher(teacher)
    data.setup("fit")
    assert stats["responses"] == 20 and stats["tokens_per_s"] > 0
    prompts = data.prompt_ids()
    for split in ("train", "validation", "test"):
        rows = data.splits[split]
        assert len(rows) == len(prompts[split])
        for row, prompt, response in zip(rows, prompts[split], data.responses[split]["response_ids"], strict=True):
            end = len(prompt) + len(response)
            assert row["input_ids"][: len(prompt)].tolist() == prompt
            assert row["input_ids"][len(prompt) : end].tolist() == response
            assert (row["labels"][: len(prompt)] == IGNORE_INDEX).all() and (row["labels"][end:] == IGNORE_INDEX).all()
            assert row["labels"][len(prompt) : end].tolist() == response
            assert row["attention_mask"].sum() == end
    text = data.tokenizer.decode(prompts["test"][0])
    assert text.startswith("< user > go on :") and "< assistant >" in text
    # Held-out prompts come from held-out works only.
    assert all("king 4" in data.tokenizer.decode(p) for p in prompts["test"])
    assert not any(
        "king 4" in data.tokenizer.decode(p) or "king 3" in data.tokenizer.decode(p) for p in prompts["train"]
    )


def test_prompt_tokens_count_in_no_loss_or_metric(poems: Path, chat_teacher_dir: Path, tmp_path: Path) -> None:
    """Garbage student logits at prompt positions change neither the KD/CE loss nor the perplexity sums;
    the counted tokens are exactly the responses'."""
    data = prompt_module(poems, chat_teacher_dir, tmp_path / "cache")
    data.attach_teacher(AutoModelForCausalLM.from_pretrained(chat_teacher_dir))
    data.setup("fit")
    batch = next(iter(data.dataloader("validation", 4, shuffle=False)))
    labels, task, vocab = batch["labels"], CausalLMTask(), len(data.tokenizer)
    student, teacher = torch.randn(*labels.shape, vocab), torch.randn(*labels.shape, vocab)
    garbage = student.clone()
    prompt_lengths = [len(p) for p in data.prompt_ids()["validation"]]
    for row, length in enumerate(prompt_lengths):
        garbage[row, : length - 1] = 1e4 * torch.randn(length - 1, vocab)  # the last prompt position predicts token 1
    responses = sum(len(r) for r in data.responses["validation"]["response_ids"])
    assert task.count_targets(labels) == responses
    reference = kd_loss_terms(*task.align(student, teacher, labels), temperature=1.0, alpha=0.5)
    perturbed = kd_loss_terms(*task.align(garbage, teacher, labels), temperature=1.0, alpha=0.5)
    torch.testing.assert_close(perturbed.loss, reference.loss)
    nll, tokens = next_token_nll(student, labels)
    garbage_nll, garbage_tokens = next_token_nll(garbage, labels)
    assert int(tokens) == int(garbage_tokens) == responses
    torch.testing.assert_close(garbage_nll, nll)


@pytest.mark.slow
def test_train_tokens_caps_the_training_rows(poems: Path, chat_teacher_dir: Path, tmp_path: Path) -> None:
    data = prompt_module(poems, chat_teacher_dir, tmp_path / "cache", train_tokens=20)
    data.attach_teacher(AutoModelForCausalLM.from_pretrained(chat_teacher_dir))
    data.setup("fit")
    counted = (data.splits["train"][:]["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1)
    assert counted.sum() >= 20 and counted[:-1].sum() < 20


def test_every_recipe_calibrates_pruning_on_the_same_corpus_blocks(poems: Path, chat_teacher_dir: Path, tmp_path: Path):
    """Structured pruning measures importance on the corpus's training blocks whatever a recipe trains on, so the
    recipes of a comparison start from one pruned student (and share its cache entry)."""
    from distill.models.student import draw_calibration_batches

    teacher = AutoModelForCausalLM.from_pretrained(chat_teacher_dir)
    drawn = []
    for train_on in ("responses", "corpus"):
        data = prompt_module(poems, chat_teacher_dir, tmp_path / "cache", train_on=train_on, train_tokens=40)
        data.attach_teacher(teacher)
        torch.manual_seed(0)
        drawn.append(draw_calibration_batches(data, 2))
    assert all(batch["input_ids"].shape[1] == 32 for batch in drawn[0])  # corpus blocks, not prompt rows
    for first, second in zip(*drawn, strict=True):
        assert torch.equal(first["input_ids"], second["input_ids"])


def test_bad_prompt_pools_are_named(poems: Path, chat_teacher_dir: Path, lm_teacher_dir: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"data.prompts.train=0: the prompt pool needs >= 1 prompt"):
        prompt_module(poems, chat_teacher_dir, cache, prompts={"train": 0, "validation": 1, "test": 1})
    with pytest.raises(ValueError, match=r"data.prompts.test=99 but the test documents hold \d+ passages"):
        prompt_module(poems, chat_teacher_dir, cache, prompts={"train": 1, "validation": 1, "test": 99}).prompt_ids()
    with pytest.raises(ValueError, match=r"a prompt of \d+ tokens exceeds data.max_prompt_tokens=10"):
        prompt_module(poems, chat_teacher_dir, cache, max_prompt_tokens=10).prompt_ids()
    with pytest.raises(ValueError, match="has no chat template"):
        prompt_module(poems, lm_teacher_dir, cache).prompt_ids()
    with pytest.raises(ValueError, match=r"max_new_tokens = 200 exceeds the model's context of 128"):
        prompt_module(poems, chat_teacher_dir, cache, max_prompt_tokens=194).check_context(128)
    with pytest.raises(ValueError, match=r"data.train_on='text' must be one of"):
        prompt_module(poems, chat_teacher_dir, cache, train_on="text")
    with pytest.raises(RuntimeError, match="generation stage"):
        prompt_module(poems, chat_teacher_dir, cache).setup("fit")


def tiny_recipe_run(teacher: Path, poems: Path, tmp_path: Path) -> list[str]:
    return [
        "experiment=smollm2_seqkd",
        f"paths.output_dir={tmp_path / 'run'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"teacher.name_or_path={teacher}",
        f"data.corpus.data_dir={poems}",
        "data.corpus.pattern=*.txt",
        "data.corpus.val_files=[work_3.txt]",
        "data.corpus.test_files=[work_4.txt]",
        "data.corpus.block_size=32",
        "data.instruction='Go on: {passage}'",
        "data.prompts={train: 16, validation: 4, test: 4}",
        "data.passage_tokens=12",
        "data.max_prompt_tokens=40",
        "data.generation.max_new_tokens=6",
        "data.train_tokens=60",
        "data.batch_size=4",
        "student.target_params=null",
        "student.shape.num_layers=2",
        "trainer.max_steps=4",
        "trainer.val_check_interval=1",
        "trainer.enable_progress_bar=false",
        "task.samples=3",
        "logger=csv",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["seqkd", "seqkd_soft", "corpus_ce", "corpus_kd", "onpolicy"])
def test_recipe_runs_end_to_end(
    recipe: str, compose_train, chat_teacher_dir: Path, poems: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    stored = recipe in ("seqkd_soft", "corpus_kd", "onpolicy")
    store = "distill.teacher_cache_topk=8" if stored else "distill.teacher_cache=none"
    extra = ["distill.on_policy.probability=1.0"] if recipe == "onpolicy" else []  # every step: some to check
    cfg = compose_train(*tiny_recipe_run(chat_teacher_dir, poems, tmp_path), f"recipe={recipe}", store, *extra)
    metrics = train(cfg)
    assert (
        metrics["teacher_store/bytes_per_token"] == 2 * 8 + 2 * 8 + 4
        if stored
        else "teacher_store/bytes_per_token" not in metrics
    )
    for key in ("student/test_ppl", "teacher/test_ppl", "student/corpus_test_ppl", "student/rougeL"):
        assert math.isfinite(metrics[key]), key
    assert metrics["generation/responses"] == 24
    samples = json.loads((tmp_path / "run" / "generations.json").read_text())["samples"]
    assert len(samples) == 3 and all({"prompt", "reference", "student"} <= set(row) for row in samples)
    assert "teacher/rougeL" not in metrics  # the references are its own greedy responses
    if recipe == "onpolicy":  # the student's samples replace some steps' responses
        assert metrics["onpolicy/batches"] == metrics["global_step"] and metrics["onpolicy/sampled_tokens"] >= 1
        return
    # One epoch over the rows data.train_tokens=60 keeps: the first whose counted tokens reach 60.
    longest_row = 31 if recipe.startswith("corpus") else 6
    assert 60 <= metrics["student/trained_tokens"] < 60 + longest_row


def test_token_mean_over_prompt_rows_is_the_whole_steps_under_accumulation(tmp_path: Path) -> None:
    """Rows with prompts of different lengths and responses of 1 to 6 tokens: four accumulated
    micro-batches take the step one batch of four takes (the mean is over the step's response tokens)."""
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16], [17]]
    responses = [[20], [21, 22, 23, 24, 25, 26], [27, 28], [29, 30, 31]]
    rows = pack_responses(prompts, responses, width=12, pad_id=0)
    items = [{name: torch.as_tensor(rows[name][i]) for name in rows} for i in range(4)]
    weights = {
        name: student_after_one_step(items, tmp_path / name, 40, 1, batch_size, accumulate)
        for name, (batch_size, accumulate) in {"whole": (4, 1), "accumulated": (1, 4)}.items()
    }
    for key, value in weights["whole"].items():
        torch.testing.assert_close(weights["accumulated"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_on_policy_steps_resample_responses_from_the_student() -> None:
    sampler = OnPolicy(OnPolicySettings(probability=0.5, max_new_tokens=4), pad_id=0, end_ids={3}, seed=1)
    draws = [sampler.draws(step) for step in range(200)]
    assert draws == [OnPolicy(OnPolicySettings(0.5), 0, {3}, seed=1).draws(step) for step in range(200)]  # reproducible
    assert 70 < sum(draws) < 130
    assert not any(OnPolicy(OnPolicySettings(0.0), 0, {3}).draws(step) for step in range(50))
    assert all(OnPolicy(OnPolicySettings(1.0), 0, {3}).draws(step) for step in range(50))
    rows = pack_responses([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], width=8, pad_id=0)
    batch = {name: torch.as_tensor(rows[name]) for name in ("input_ids", "attention_mask")}
    new_batch, labels = sampler.resample(tiny_llama(40, layers=1), batch, torch.as_tensor(rows["labels"]))
    for row, prompt in enumerate([[5, 6, 7], [8]]):
        assert new_batch["input_ids"][row, : len(prompt)].tolist() == prompt
        assert (labels[row, : len(prompt)] == IGNORE_INDEX).all()
        sampled = labels[row][labels[row] != IGNORE_INDEX]
        assert 1 <= len(sampled) <= 4
        assert new_batch["attention_mask"][row].sum() == len(prompt) + len(sampled)
    assert sampler.metrics()["onpolicy/batches"] == 1
    with pytest.raises(ValueError, match=r"distill.on_policy.probability=1.5 must be in \[0, 1\]"):
        OnPolicySettings(1.5)


def test_generate_cli_fills_the_cache_the_run_reads(
    compose_train, chat_teacher_dir: Path, poems: Path, tmp_path: Path
) -> None:
    from hydra.utils import instantiate

    from distill.generate import generate

    overrides = [
        f"model={chat_teacher_dir}",
        f"paths.output_dir={tmp_path / 'generate'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"data.corpus.data_dir={poems}",
        "data.corpus.pattern=*.txt",
        "data.corpus.val_files=[work_3.txt]",
        "data.corpus.test_files=[work_4.txt]",
        "data.prompts={train: 16, validation: 4, test: 4}",
        "data.passage_tokens=12",
        "data.max_prompt_tokens=40",
        "data.generation.max_new_tokens=6",
        "data.instruction='Go on: {passage}'",
        "seed=7",  # greedy responses do not depend on the seed: the run's seed 42 shares the store
    ]
    report = generate(compose_train(*overrides, config_name="generate"))
    assert report["responses"] == 24 and report["tokens_per_s"] > 0
    shards = {path: path.stat().st_mtime_ns for path in Path(report["store"]).glob("shard-*.parquet")}
    assert shards and json.loads((tmp_path / "generate" / "generation.json").read_text())["store"] == report["store"]
    data = instantiate(compose_train(*overrides[:-1], "seed=42", config_name="generate").data)
    data.attach_teacher(AutoModelForCausalLM.from_pretrained(chat_teacher_dir))
    assert str(data.store.folder) == report["store"]
    assert {path: path.stat().st_mtime_ns for path in data.store.folder.glob("shard-*.parquet")} == shards
