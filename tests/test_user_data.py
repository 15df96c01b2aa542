"""The user's own data: text tables (JSONL, CSV, parquet), chat conversations with the loss on the assistant
turns only and the one-line error on a row without its column (a streamed corpus: tests/test_streaming.py)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from distill.data.chat import ChatDataModule, chat_row
from distill.data.text import IGNORE_INDEX, TextDataModule
from distill.train import train
from tests.test_check_phase import FAST_S, HALF, run_cli

TOPICS = ("kings", "rivers", "stars", "bread", "ships")


def conversation(row: int) -> list[dict[str, str]]:
    topic = TOPICS[row % len(TOPICS)]
    return [
        {"role": "system", "content": "you answer briefly."},
        {"role": "user", "content": f"tell me about {topic} number {row}."},
        {"role": "assistant", "content": f"{topic} are fine, {row} times over."},
        {"role": "user", "content": "and more?"},
        {"role": "assistant", "content": f"more {topic}."},
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def chat_dir(tmp_path: Path) -> Path:
    """A few hundred conversations: train, validation and test files."""
    folder = tmp_path / "chat"
    for name, rows in (("train", range(300)), ("validation", range(300, 320)), ("test", range(320, 340))):
        write_jsonl(folder / f"{name}.jsonl", [{"messages": conversation(row)} for row in rows])
    return folder


def chat_module(folder: Path, teacher: Path, cache: Path, **overrides) -> ChatDataModule:
    settings = dict(val_files=["validation.jsonl"], test_files=["test.jsonl"], max_length=64, batch_size=4)
    return ChatDataModule(str(folder), str(cache), str(teacher), **{**settings, **overrides})


def test_chat_labels_are_the_assistant_turns_only(chat_teacher_dir: Path, chat_dir: Path, tmp_path: Path) -> None:
    data = chat_module(chat_dir, chat_teacher_dir, tmp_path / "cache")
    data.setup("fit")
    assert len(data.splits["train"]) == 300 and len(data.splits["test"]) == 20
    batch = next(iter(data.train_dataloader()))
    tokenizer = data.tokenizer
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        counted = labels != IGNORE_INDEX
        assert torch.equal(labels[counted], ids[counted]) and not counted[mask == 0].any()
        # The counted tokens are exactly the two answers and their end-of-turn separators.
        answers = [answer.strip() for answer in tokenizer.decode(ids[counted]).split(tokenizer.sep_token)]
        topic = answers[1].removeprefix("more ").removesuffix(".")
        assert topic in TOPICS and answers[0].startswith(f"{topic} are fine") and answers[2:] == [""]


def test_chat_row_masks_by_rendered_turns(chat_teacher_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(chat_teacher_dir)
    messages = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello you"}]
    row = chat_row(tokenizer, messages, max_length=16, pad_id=0)
    counted = [token for token, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE_INDEX]
    assert tokenizer.convert_ids_to_tokens(counted) == ["hello", "you", "[SEP]"]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert row["attention_mask"].count(1) == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_text_tables_are_one_document_per_row(suffix: str, tmp_path: Path, hf_teacher_available: str) -> None:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name, rows in (("train", range(6)), ("validation", range(6, 8)), ("test", range(8, 10))):
        table = datasets.Dataset.from_dict({"body": [f"document {row} says hello to the world" for row in rows]})
        getattr(table, {"jsonl": "to_json", "csv": "to_csv", "parquet": "to_parquet"}[suffix])(
            str(folder / f"{name}.{suffix}")
        )
    data = TextDataModule(
        str(folder),
        str(tmp_path / "cache"),
        hf_teacher_available,
        val_files=[f"validation.{suffix}"],
        test_files=[f"test.{suffix}"],
        pattern=f"*.{suffix}",
        text_field="body",
        block_size=8,
    )
    data.setup("fit")
    assert data.documents("test") == [f"test.{suffix}#0", f"test.{suffix}#1"]
    assert data.document_texts("validation") == [
        "document 6 says hello to the world",
        "document 7 says hello to the world",
    ]
    assert len(data.splits["train"]) > 0


def test_a_row_without_the_column_fails_in_one_line(tmp_path: Path, hf_teacher_available: str) -> None:
    folder = tmp_path / "corpus"
    write_jsonl(folder / "train.jsonl", [{"text": "a fine row"}, {"text": "another"}, {"body": "no text here"}])
    data = TextDataModule(str(folder), str(tmp_path / "cache"), hf_teacher_available, pattern="*.jsonl")
    start = time.perf_counter()
    with pytest.raises(ValueError) as error:
        data.prepare_data()
    message = str(error.value)
    assert "\n" not in message and time.perf_counter() - start < 3
    assert f"{folder / 'train.jsonl'} row 3 has no 'text' column" in message and "data.text_field=" in message


def test_chat_rows_without_messages_name_the_setting(tmp_path: Path, chat_teacher_dir: Path) -> None:
    folder = tmp_path / "chat"
    write_jsonl(folder / "train.jsonl", [{"text": "not a conversation"}])
    data = chat_module(folder, chat_teacher_dir, tmp_path / "cache", val_files=[], test_files=[])
    with pytest.raises(ValueError, match=r"train.jsonl row 1 has no 'messages' column .*data.messages_field="):
        data.prepare_data()


@pytest.mark.slow
def test_chat_conversations_distil_end_to_end(
    compose_train, chat_teacher_dir: Path, chat_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data=chat through the whole run, teacher-logit store included: a few steps on assistant tokens only."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_train(
        *("task=causal_lm", "teacher=smollm2", "student=smollm2_half", "data=chat", "debug=smoke", "logger=csv"),
        f"paths.output_dir={tmp_path / 'run'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"teacher.name_or_path={chat_teacher_dir}",
        f"data.data_dir={chat_dir}",
        "data.max_length=64",
        *("student.target_params=null", "student.shape.num_layers=2", "task.new_tokens=4"),
        *("distill.teacher_cache=precompute", "distill.teacher_cache_topk=8", "distill.alpha=0.5"),
        *("trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.enable_progress_bar=false"),
        *("callbacks.model_checkpoint.monitor=val/ppl", "callbacks.model_checkpoint.mode=min"),
    )
    metrics = train(cfg)
    assert metrics["global_step"] == 4 and math.isfinite(metrics["student/test_ppl"])
    data = chat_module(chat_dir, chat_teacher_dir, tmp_path / "check", batch_size=cfg.data.batch_size)
    data.setup("fit")
    # Every step counts the assistant tokens of its batch only: the conversations' shifted answer labels.
    answers = [int((row["labels"][1:] != IGNORE_INDEX).sum()) for row in data.splits["train"]]
    assert min(answers) * 16 <= metrics["student/trained_tokens"] <= max(answers) * 16


@pytest.mark.slow
def test_cli_a_row_without_the_column_stops_the_run_before_the_teacher_stage(tmp_path: Path, lm_teacher_dir: Path):
    folder = tmp_path / "corpus"
    for name in ("train", "validation", "test"):
        write_jsonl(folder / f"{name}.jsonl", [{"text": f"{name} row"}] * 2 + [{"body": "no text"}] * (name == "train"))
    line, elapsed = run_cli(
        "distill.train",
        *("task=causal_lm", "teacher=smollm2", "student=smollm2_half", "data=files", *HALF),
        f"teacher.name_or_path={lm_teacher_dir}",
        f"data.data_dir={folder}",
        f"paths.output_dir={tmp_path / 'run'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        cache=tmp_path / "cache",
    )
    assert line.endswith(f"{folder / 'train.jsonl'} row 3 has no 'text' column (its columns: ['text', 'body']): set "
                         "data.text_field=<the column holding each document>"), line  # fmt: skip
    assert elapsed < FAST_S
