"""A streamed training corpus (distill/data/streaming.py): blocks packed as read, never materialized, from a
generator, local files or a hub dataset."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import datasets
import pytest
import torch

from distill.data.documents import DocumentSource
from distill.data.text import TextDataModule, pack_blocks, token_stream
from distill.pipeline.checks import check_run
from distill.train import train
from distill.utils.keys import EXAMPLE_INDEX
from tests.test_user_data import TOPICS, write_jsonl


def generated_documents(count: int, drawn: list[int]) -> datasets.IterableDataset:
    """A corpus of ``count`` documents made as they are read; ``drawn`` counts those read so far."""

    def documents():
        for row in range(count):
            drawn.append(row)
            yield {"text": f"streamed document {row} tells of {TOPICS[row % len(TOPICS)]} and more {row}."}

    return datasets.IterableDataset.from_generator(documents)


def test_a_stream_packs_blocks_as_read_and_resumes(corpus: Path, tmp_path: Path, hf_teacher_available: str) -> None:
    drawn: list[int] = []
    settings = dict(val_files=["work_3.txt"], test_files=["work_4.txt"], block_size=8, batch_size=2)
    data = TextDataModule(str(corpus), str(tmp_path / "cache"), hf_teacher_available, **settings)
    streamed = TextDataModule(
        str(corpus),
        str(tmp_path / "cache"),
        hf_teacher_available,
        train_stream=generated_documents(10**6, drawn),
        **settings,
    )
    streamed.setup("fit")
    data.setup("fit")
    # The held-out splits are the files' as without a stream; no training split is ever materialized.
    assert "train" not in streamed.splits
    assert torch.equal(streamed.splits["test"][:]["input_ids"], data.splits["test"][:]["input_ids"])
    loader = streamed.train_dataloader()
    batches = list(itertools.islice(loader, 3))
    assert len(drawn) < 10  # a million documents, a handful read
    expected = pack_blocks(token_stream(streamed_tokens(streamed, len(drawn))), 8, 0, keep_tail=False)["input_ids"]
    assert torch.equal(torch.cat([batch["input_ids"] for batch in batches]), torch.from_numpy(expected[:6]))
    assert torch.cat([batch[EXAMPLE_INDEX] for batch in batches]).tolist() == list(range(6))
    # A resumed loader starts after the batches the checkpoint counted.
    resumed = streamed.dataloader("train", 2, shuffle=True)
    resumed.load_state_dict({"batches": 2})
    assert torch.equal(next(iter(resumed))["input_ids"], batches[2]["input_ids"])
    assert loader.state_dict() == {"batches": 3}


def streamed_tokens(data: TextDataModule, count: int) -> datasets.Dataset:
    texts = [row["text"] for row in itertools.islice(data.train_stream, count)]
    return datasets.Dataset.from_dict(data._tokenize_batch({"text": texts}))


@pytest.mark.slow
def test_a_generated_stream_trains_without_materializing(
    compose_train, lm_teacher_dir: Path, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drawn: list[int] = []
    monkeypatch.setattr(DocumentSource, "stream", lambda self: generated_documents(10**6, drawn))
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_train(*stream_run(tmp_path, lm_teacher_dir, corpus), "distill.teacher_cache=none")
    metrics = train(cfg)
    assert metrics["global_step"] == 4 and math.isfinite(metrics["student/test_ppl"])
    assert metrics["student/trained_tokens"] == 4 * 2 * 15 and len(drawn) < 100


def stream_run(tmp_path: Path, teacher: Path, corpus: Path) -> list[str]:
    return [
        *("task=causal_lm", "teacher=smollm2", "student=smollm2_half", "data=files", "debug=smoke", "logger=csv"),
        f"paths.output_dir={tmp_path / 'run'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"teacher.name_or_path={teacher}",
        f"data.data_dir={corpus}",
        *("data.pattern=*.txt", "data.val_files=[work_3.txt]", "data.test_files=[work_4.txt]"),
        *("data.block_size=16", "data.batch_size=2", "data.streaming=true"),
        *("student.target_params=null", "student.shape.num_layers=2", "task.new_tokens=4"),
        *("trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.enable_progress_bar=false"),
        *("callbacks.model_checkpoint.monitor=val/ppl", "callbacks.model_checkpoint.mode=min"),
    ]


def test_a_stream_refuses_the_logit_store_in_one_line(
    compose_train, lm_teacher_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    cfg = compose_train(*stream_run(tmp_path, lm_teacher_dir, corpus), "distill.teacher_cache=precompute")
    with pytest.raises(
        ValueError, match=r"^data.streaming=true .* set distill.teacher_cache=none \(the live teacher\)$"
    ):
        check_run(cfg)


@pytest.mark.parametrize("suffix", ["txt", "jsonl"])
def test_local_files_stream_their_training_documents(suffix: str, tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    for name in ("a", "b", "held"):
        if suffix == "txt":
            (folder / f"{name}.txt").parent.mkdir(exist_ok=True)
            (folder / f"{name}.txt").write_text(f"all of {name}\nin two lines")
        else:
            write_jsonl(folder / f"{name}.jsonl", [{"body": f"{name} {row}"} for row in range(2)])
    source = DocumentSource(folder, tmp_path / "cache", f"*.{suffix}", test_files=[f"held.{suffix}"], text_field="body")
    stream = source.stream()
    assert isinstance(stream, datasets.IterableDataset)
    expected = ["all of a\nin two lines", "all of b\nin two lines"] if suffix == "txt" else ["a 0", "a 1", "b 0", "b 1"]
    assert [row["text"] for row in stream] == expected


def test_a_streamed_hub_dataset_reads_its_held_out_splits_only(tmp_path: Path, hf_teacher_available: str) -> None:
    hub = tmp_path / "hub"
    for split, rows in (("train", range(50)), ("validation", range(50, 52)), ("test", range(52, 55))):
        write_jsonl(hub / f"{split}.jsonl", [{"body": f"hub document {row} of many words"} for row in rows])
    data = TextDataModule(
        "/nonexistent", str(tmp_path / "cache"), hf_teacher_available, pattern="*.none", hub_dataset=str(hub),
        text_field="body", block_size=8, batch_size=2, streaming=True,
    )  # fmt: skip
    data.setup("fit")
    assert "train" not in data.splits and data.documents("test") == [f"{hub}/test/{row}" for row in range(3)]
    assert data.document_texts("validation") == ["hub document 50 of many words", "hub document 51 of many words"]
    batch = next(iter(data.train_dataloader()))
    assert data.tokenizer.decode(batch["input_ids"][0]).startswith("hub document 0 of")


def test_a_stream_is_read_once_whatever_the_loader_workers(
    corpus: Path, tmp_path: Path, hf_teacher_available: str
) -> None:
    stream = generated_documents(40, [])
    data = TextDataModule(
        str(corpus), str(tmp_path / "cache"), hf_teacher_available, val_files=["work_3.txt"],
        test_files=["work_4.txt"], block_size=8, num_workers=2, train_stream=stream,
    )  # fmt: skip
    indices = torch.cat([batch[EXAMPLE_INDEX] for batch in data.dataloader("train", 2, shuffle=True, shard=(0, 1))])
    assert sorted(indices.tolist()) == list(range(len(indices)))
