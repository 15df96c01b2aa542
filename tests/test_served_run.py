"""`distill.train` with a served teacher (teacher=endpoint) end to end: a fake OpenAI-compatible server in a thread
answers from the tiny chat teacher in-process, so the run's training process holds no teacher weights during fit."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.train import train
from tests.test_endpoint_teacher import FakeServer
from tests.test_prompts import tiny_recipe_run

K = 8


class TinyModelAnswers:
    """llama.cpp's /v1/completions answers (greedy, each token's id and top-k log-probabilities) from a model."""

    def __init__(self, folder: Path) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(folder).eval()
        self.lock = threading.Lock()  # the server's threads share one model

    def __call__(self, path: str, body: dict) -> tuple[int, str]:
        if path == "/v1/models":
            return 200, json.dumps({"data": [{"id": "tiny"}]})
        with self.lock, torch.no_grad():
            content = self.greedy(list(body["prompt"]), body["max_tokens"], body["logprobs"])
        return 200, json.dumps({"choices": [{"logprobs": {"content": content}, "finish_reason": "length"}]})

    def greedy(self, ids: list[int], max_tokens: int, k: int) -> list[dict]:
        content = []
        for _ in range(max_tokens):
            log_probs = self.model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
            values, indices = log_probs.topk(k)
            top = [{"id": int(i), "logprob": float(v)} for v, i in zip(values, indices, strict=True)]
            content.append({"id": top[0]["id"], "logprob": top[0]["logprob"], "top_logprobs": top})
            ids.append(top[0]["id"])
        return content


@pytest.fixture
def tiny_server(chat_teacher_dir: Path):
    server = FakeServer(TinyModelAnswers(chat_teacher_dir))
    yield server
    server.stop()


def served_run(chat_teacher_dir: Path, poems: Path, tmp_path: Path, url: str) -> list[str]:
    return [
        *tiny_recipe_run(chat_teacher_dir, poems, tmp_path),
        "recipe=seqkd_soft",
        "teacher=endpoint",
        f"teacher.name_or_path={chat_teacher_dir}",
        f"teacher.base_url={url}",
        "teacher.model=tiny",
        f"teacher.top_logprobs={K}",
        f"distill.teacher_cache_topk={K}",
        "teacher.backoff_s=0.01",
    ]


def test_seqkd_soft_runs_from_a_served_teacher(
    compose_train, chat_teacher_dir, poems, tmp_path, tiny_server, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    metrics = train(compose_train(*served_run(chat_teacher_dir, poems, tmp_path, tiny_server.url)))
    for key in ("student/test_ppl", "student/corpus_test_ppl", "student/rougeL"):
        assert math.isfinite(metrics[key]), key
    assert metrics["global_step"] >= 1 and metrics["student/trained_tokens"] > 0
    # No teacher weights in the training process: no teacher size, no held-out teacher perplexity.
    assert "teacher/params" not in metrics and metrics.get("teacher/test_ppl") is None
    assert metrics["generation/responses"] == 24
    # 24 responses of 6 tokens, one request each, plus the preflight probe (outside the store's count)
    assert metrics["generation/server_requests"] == 24 and metrics["generation/server_completion_tokens"] == 24 * 6
    assert metrics["generation/server_retries"] == 0 and metrics["generation/server_seconds"] > 0
    assert metrics["teacher_store/bytes_per_token"] > 0
    assert 60 <= metrics["student/trained_tokens"] < 66


@pytest.mark.parametrize(
    ("setting", "error"),
    [
        (
            "distill.temperature=2.0",
            r"distill.temperature=2.0: a served teacher's log-probabilities are at temperature 1",
        ),
        ("teacher.top_logprobs=0", r"it needs teacher.top_logprobs > 0 \(now 0\)"),
        ("distill.on_policy.probability=0.5", r"a served teacher \(teacher=endpoint\) cannot grade the student's"),
    ],
)
def test_what_a_served_teacher_cannot_do_is_refused_before_any_stage(
    setting: str, error: str, compose_train, chat_teacher_dir, poems, tmp_path
) -> None:
    overrides = [*served_run(chat_teacher_dir, poems, tmp_path, "http://127.0.0.1:9"), setting]
    with pytest.raises(ValueError, match=error):  # the unreachable server is never asked
        train(compose_train(*overrides))
