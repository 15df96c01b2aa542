"""The user's conversations as the prompt pool (data=chat_prompts): openings, held-out files, a chat API sent
the messages, and sequence-level and on-policy distillation on them end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from distill.data.prompts import PromptResponseDataModule, awaiting
from distill.data.text import IGNORE_INDEX
from distill.serve.endpoint import EndpointClient, EndpointSettings
from distill.train import train
from tests.test_endpoint_teacher import serve  # noqa: F401  (the fake server fixture)
from tests.test_user_data import chat_dir, chat_module  # noqa: F401  (a few hundred conversations)

COUNTS = {"train": 12, "validation": 4, "test": 4}


def pool(chat_dir: Path, teacher: Path, cache: Path) -> PromptResponseDataModule:  # noqa: F811
    corpus = chat_module(chat_dir, teacher, cache)
    settings = dict(prompts=COUNTS, max_prompt_tokens=48, generation={"max_new_tokens": 5}, shard_size=5)
    return PromptResponseDataModule(corpus, str(cache), **settings, batch_size=4, eval_batch_size=4)


def test_a_conversation_awaits_the_answer_after_its_last_user_turn() -> None:
    turns = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    assert awaiting(turns) == turns[:4]  # earlier answers stay as context; the last is the teacher's to give
    assert awaiting(turns[:4]) == turns[:4] and awaiting(turns[:1]) is None


def test_conversations_are_the_prompt_pool_and_held_out_ones_come_from_held_out_files(
    chat_dir: Path,  # noqa: F811
    chat_teacher_dir: Path,
    tmp_path: Path,
) -> None:
    data = pool(chat_dir, chat_teacher_dir, tmp_path / "cache")
    tokenizer = AutoTokenizer.from_pretrained(chat_teacher_dir)
    prompts = data.prompt_set()
    for split, rows in (("train", range(300)), ("validation", range(300, 320)), ("test", range(320, 340))):
        assert len(prompts[split]) == COUNTS[split]
        for ids, messages in prompts[split]:
            assert messages[-1] == {"role": "user", "content": "and more?"} and len(messages) == 4
            assert int(messages[1]["content"].split()[-1].rstrip(".")) in rows
            rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_a_chat_api_is_sent_each_conversation_and_its_answers_become_the_rows(
    serve,  # noqa: F811
    chat_dir: Path,  # noqa: F811
    chat_teacher_dir: Path,
    tmp_path: Path,
) -> None:
    def chat(path: str, body: dict) -> tuple[int, str]:
        if path == "/v1/models":
            return 200, json.dumps({"data": [{"id": "frontier"}]})
        topic = body["messages"][1]["content"].split()[3]
        message = {"role": "assistant", "content": f"more {topic}."}
        return 200, json.dumps({"choices": [{"message": message, "finish_reason": "stop"}]})

    server = serve(chat)
    settings = EndpointSettings(base_url=server.url, model="frontier", api="chat", max_retries=0)
    data = pool(chat_dir, chat_teacher_dir, tmp_path / "cache")
    stats = data.attach_teacher(EndpointClient(settings, tokenizer=str(chat_teacher_dir)))
    data.setup("fit")
    sent = [body["messages"] for path, body, _ in server.requests if path == "/v1/chat/completions"]
    assert stats["responses"] == sum(COUNTS.values()) and len(sent) == stats["responses"]
    assert sorted(map(json.dumps, sent)) == sorted(
        json.dumps(m) for split in data.prompt_set().values() for _, m in split
    )
    tokenizer = AutoTokenizer.from_pretrained(chat_teacher_dir)
    for row, messages in zip(data.splits["validation"], [m for _, m in data.prompt_set()["validation"]], strict=True):
        answer = tokenizer(f"more {messages[1]['content'].split()[3]}.", add_special_tokens=False)["input_ids"]
        assert tokenizer.eos_token_id is None  # the BERT tokenizer has no end token to append on "stop"
        assert row["labels"][row["labels"] != IGNORE_INDEX].tolist() == answer


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["seqkd_soft", "onpolicy"])
def test_conversations_distil_by_sequence_and_on_policy_end_to_end(
    recipe: str,
    compose_train,
    chat_dir: Path,  # noqa: F811
    chat_teacher_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_train(
        *("experiment=smollm2_seqkd", "data=chat_prompts", f"recipe={recipe}", "logger=csv"),
        *(f"paths.output_dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}"),
        *(f"teacher.name_or_path={chat_teacher_dir}", f"data.corpus.data_dir={chat_dir}", "data.corpus.max_length=64"),
        *("data.prompts={train: 16, validation: 4, test: 4}", "data.max_prompt_tokens=48"),
        *("data.generation.max_new_tokens=6", "data.train_tokens=60", "data.batch_size=4"),
        *("student.target_params=null", "student.shape.num_layers=2", "task.samples=3"),
        "distill.teacher_cache_topk=8",
        *(["distill.on_policy.probability=1.0"] if recipe == "onpolicy" else []),  # every step: some to check
        *("trainer.max_steps=4", "trainer.val_check_interval=1", "trainer.enable_progress_bar=false"),
    )
    metrics = train(cfg)
    assert metrics["generation/responses"] == 24 and math.isfinite(metrics["student/rougeL"])
    assert math.isfinite(metrics["student/test_ppl"]) and math.isfinite(metrics["student/corpus_test_ppl"])
    if recipe == "onpolicy":
        assert metrics["onpolicy/batches"] == metrics["global_step"] and metrics["onpolicy/sampled_tokens"] >= 1
    else:  # the rows data.train_tokens=60 keeps: the first whose counted answer tokens reach 60
        assert 60 <= metrics["student/trained_tokens"] < 60 + 6
