"""A streamed training corpus (distill/data/streaming.py): blocks packed as read, a seeded shuffle buffer whose
order is a function of (seed, epoch, stream) and the same on every rank, and a resume that is exact: the
checkpoint holds the epoch, the batches trained and the random streams."""

from __future__ import annotations

import itertools
import math
import random
import warnings
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoTokenizer

from distill.config.schemas import validate
from distill.data.documents import DocumentSource
from distill.data.streaming import PackedStream, StreamLoader, lightning_read_ahead, shuffled
from distill.data.text import TextDataModule, pack_blocks, token_stream
from distill.pipeline.checks import check_run
from distill.pipeline.interrupt import Interrupted
from distill.train import train
from distill.utils.keys import EXAMPLE_INDEX
from tests.conftest import tiny_llama
from tests.test_exact_resume import Noisy, SaveAt, TermAt, assert_same_run, into, loader_state, quiet_trainer
from tests.test_user_data import TOPICS, write_jsonl

BLOCK = 4


def numbered_blocks(count: int) -> list[dict[str, str]]:
    """Documents that encode (:func:`as_block`) to one block each: block ``i`` is ``[i] * BLOCK``."""
    return [{"text": str(row)} for row in range(count)]


def as_block(text: str) -> list[int]:
    return [int(text)] * BLOCK


def stream(count: int, shard: tuple[int, int] = (0, 1), buffer: int | None = 8, seed: int = 0) -> PackedStream:
    return PackedStream(numbered_blocks(count), as_block, BLOCK, shard, shuffle_buffer=buffer, seed=seed)


def order(blocks: PackedStream, epoch: int = 0) -> list[int]:
    return [index for index, _ in blocks.order(epoch)]


def indices(loader: StreamLoader) -> list[int]:
    return [index for batch in loader for index in batch[EXAMPLE_INDEX].tolist()]


def test_the_shuffle_buffer_permutes_within_its_window() -> None:
    out = list(shuffled(range(100), 8, np.random.default_rng(0)))
    assert sorted(out) == list(range(100)) and out != list(range(100))
    # An item leaves the buffer only once read: at most 7 places early (late, any number).
    assert all(item < place + 8 for place, item in enumerate(out))
    assert list(shuffled(range(5), 8, np.random.default_rng(0))) != list(range(5))  # shorter than the buffer


def test_an_epochs_order_is_a_function_of_seed_epoch_and_stream() -> None:
    first = order(stream(60))
    assert sorted(first) == list(range(60)) and first == order(stream(60))
    assert order(stream(60), epoch=1) != first
    assert order(stream(60, seed=1)) != first
    assert order(stream(60, seed=-1)) != first  # any int seed
    for unshuffled in (None, 0):
        assert order(stream(60, buffer=unshuffled), epoch=3) == list(range(60))
    # The blocks themselves travel with their place in the stream.
    assert all((block == index).all() for index, block in stream(60).order(2))


def test_ranks_take_disjoint_blocks_of_one_shuffled_order() -> None:
    def rank(number: int) -> list[int]:
        loader = StreamLoader(stream(40, shard=(number, 2)), batch_size=2)
        loader.epochs.set_epoch(1)
        return indices(loader)

    ranks = [rank(0), rank(1)]
    assert not set(ranks[0]) & set(ranks[1])
    dealt = [index for pair in zip(*ranks, strict=True) for index in pair]
    assert dealt == order(stream(40), epoch=1) and dealt != list(range(40))


def draws() -> list[float]:
    return [torch.rand(1).item(), float(np.random.rand()), random.random()]


def test_a_loader_state_resumes_its_epoch_place_and_random_streams() -> None:
    loader = StreamLoader(stream(40), batch_size=2)  # read_ahead=0: a plain loop trains what it reads
    loader.epochs.set_epoch(2)
    iterator = iter(loader)
    trained = [next(iterator) for _ in range(3)]
    state = loader.state_dict()
    assert (state["epoch"], state["batches"], len(state["ranks"])) == (2, 3, 1)
    expected = [next(iterator)[EXAMPLE_INDEX].tolist(), draws()]

    torch.manual_seed(5)  # what a resumed process draws before its first batch does not count
    resumed = StreamLoader(stream(40), batch_size=2)
    resumed.load_state_dict(state)
    assert resumed.state_dict()["epoch"] == 2  # a loaded state is the place until the epoch starts
    assert [next(iter(resumed))[EXAMPLE_INDEX].tolist(), draws()] == expected
    assert trained[0][EXAMPLE_INDEX].tolist() == order(stream(40), epoch=2)[:2]


def test_a_loader_reading_ahead_counts_the_batch_in_hand_as_untrained() -> None:
    """As under Lightning's fit loop: a batch is trained once the next one is asked for, or the stream ended."""
    loader = StreamLoader(stream(6, buffer=None), batch_size=2, read_ahead=1)
    batches = iter(loader)
    next(batches), next(batches)  # [0, 1] trained, [2, 3] in hand
    state = loader.state_dict()
    expected = draws()
    assert (state["epoch"], state["batches"]) == (0, 1)
    next(batches)
    assert loader.position() == (0, 2)
    assert next(batches, None) is None and loader.position() == (1, 0)  # the stream ended: the next epoch's start

    resumed = StreamLoader(stream(6, buffer=None), batch_size=2, read_ahead=1)
    resumed.load_state_dict(state)
    batches = iter(resumed)
    assert next(batches)[EXAMPLE_INDEX].tolist() == [2, 3]
    torch.manual_seed(5)  # drawn between reading ahead and the first resumed step: does not count
    assert next(batches)[EXAMPLE_INDEX].tolist() == [4, 5]
    assert draws() == expected
    # A state that comes after the batch in hand was read (trainer=fsdp restores after setup) cannot be exact.
    late = StreamLoader(stream(6, buffer=None), batch_size=2, read_ahead=1)
    next(iter(late))
    with pytest.raises(ValueError, match=r"after it had read the batch Lightning trains first .* trainer=ddp"):
        late.load_state_dict(state)


def two_ranks_state(rank: int, folder: Path) -> None:
    """One rank of two: reads 3 batches, saves, then resumes a fresh loader from the gathered state."""
    dist.init_process_group("gloo", init_method=f"file://{folder / 'rendezvous'}", rank=rank, world_size=2)
    torch.manual_seed(rank)  # each rank's streams are its own
    batches = iter(loader := StreamLoader(stream(40, shard=(rank, 2)), batch_size=2))
    for _ in range(3):
        next(batches)
    state = loader.state_dict()
    expected = [next(batches)[EXAMPLE_INDEX].tolist(), draws()]
    torch.manual_seed(99)
    resumed = StreamLoader(stream(40, shard=(rank, 2)), batch_size=2)
    resumed.load_state_dict(state)
    actual = [next(iter(resumed))[EXAMPLE_INDEX].tolist(), draws()]
    torch.save({"ranks": len(state["ranks"]), "expected": expected, "actual": actual}, folder / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.distributed
def test_every_rank_saves_and_resumes_its_own_streams(tmp_path: Path) -> None:
    mp.spawn(two_ranks_state, args=(tmp_path,), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert all(rank["ranks"] == 2 and rank["actual"] == rank["expected"] for rank in ranks)
    assert ranks[0]["expected"] != ranks[1]["expected"]  # other blocks, other draws


class StreamedNoisy(Noisy):
    """Noisy on streamed blocks (dropout, numpy and Python draws each step); records the blocks it trains."""

    def __init__(self) -> None:
        super().__init__()
        self.trained: list[int] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.trained += batch[EXAMPLE_INDEX].tolist()
        return super().training_step(batch["input_ids"][:, :3].float(), batch_idx)


def fit_stream(tmp_path: Path, limit: int | None, callbacks: list, ckpt_path: Path | None = None) -> StreamedNoisy:
    trainer = quiet_trainer(tmp_path, callbacks, limit_train_batches=limit)
    module = StreamedNoisy()
    torch.manual_seed(123)  # a resumed process's own draws before fit must not matter
    loader = StreamLoader(stream(20, buffer=4, seed=3), batch_size=2, read_ahead=lightning_read_ahead(trainer))
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
    return module


@pytest.mark.parametrize(
    ("limit", "stop_at", "place"),
    [(None, 12, (1, 2)), (None, 10, (1, 0)), (4, 6, (1, 2)), (4, 8, (1, 4))],
    ids=["read_ahead_mid_epoch", "read_ahead_epoch_end", "epoch_limit_mid_epoch", "epoch_limit_epoch_end"],
)
def test_a_resumed_stream_trains_what_an_uninterrupted_one_does(
    tmp_path: Path, limit: int | None, stop_at: int, place: tuple[int, int]
) -> None:
    """20 blocks in batches of 2 (10 a stream's epoch, or limit_train_batches=4), 13 steps, shuffled each epoch."""
    checkpoint = tmp_path / "stopped.ckpt"
    straight = fit_stream(tmp_path, limit, [SaveAt(stop_at, str(checkpoint))])
    state = loader_state(checkpoint)
    assert (state["epoch"], state["batches"]) == place
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not resumable.*")
        resumed = fit_stream(tmp_path, limit, [], ckpt_path=checkpoint)
    assert resumed.trained == straight.trained[stop_at * 2 :]
    epoch = 2 * (limit or 10)
    assert straight.trained[epoch : epoch + 6] != straight.trained[:6]  # each epoch is shuffled anew
    assert torch.equal(straight.layer.weight, resumed.layer.weight)
    assert torch.equal(straight.layer.bias, resumed.layer.bias)


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
    # A resumed loader starts after the batches the checkpoint counted (all those read: no trainer reads ahead).
    state = loader.state_dict()
    assert (state["epoch"], state["batches"]) == (0, 3)
    resumed = streamed.dataloader("train", 2, shuffle=True)
    resumed.load_state_dict(state | {"batches": 2})
    assert torch.equal(next(iter(resumed))["input_ids"], batches[2]["input_ids"])


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


def stream_run(tmp_path: Path, teacher: Path, corpus: Path, output: str = "run") -> list[str]:
    return [
        *("task=causal_lm", "teacher=smollm2", "student=smollm2_half", "data=files", "debug=smoke", "logger=csv"),
        f"paths.output_dir={tmp_path / output}",
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


def test_a_streamed_data_module_shuffles_with_its_seed_and_the_epoch(
    corpus: Path, tmp_path: Path, hf_teacher_available: str
) -> None:
    def streamed(seed: int, epoch: int = 0) -> list[int]:
        data = TextDataModule(
            str(corpus), str(tmp_path / "cache"), hf_teacher_available, val_files=["work_3.txt"],
            test_files=["work_4.txt"], block_size=8, train_stream=generated_documents(30, []), shuffle_buffer=16,
            seed=seed,
        )  # fmt: skip
        loader = data.train_dataloader()
        loader.epochs.set_epoch(epoch)
        return indices(loader)

    first = streamed(0)
    assert sorted(first) == list(range(len(first))) and first != sorted(first)
    assert all(index < place + 16 for place, index in enumerate(first))
    assert streamed(0) == first and streamed(0, epoch=1) != first and streamed(1) != first


def test_a_bad_shuffle_buffer_fails_when_the_config_is_checked(
    compose_train, lm_teacher_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    cfg = compose_train(*stream_run(tmp_path, lm_teacher_dir, corpus), "data.shuffle_buffer=-2")
    with pytest.raises(ValueError, match=r"^data.shuffle_buffer=-2 must be a number of blocks >= 0 \(0 or null: "):
        validate(cfg)
    validate(compose_train(*stream_run(tmp_path, lm_teacher_dir, corpus), "data.shuffle_buffer=0"))


@pytest.fixture
def dropout_teacher_dir(tmp_path: Path, hf_teacher_available: str) -> Path:
    """The tiny Llama teacher with attention dropout, which the pruned student keeps: every step draws."""
    tokenizer = AutoTokenizer.from_pretrained(hf_teacher_available)
    model = tiny_llama(len(tokenizer))
    model.config.attention_dropout = 0.25
    path = tmp_path / "dropout_teacher"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
def test_a_shuffled_stream_with_dropout_resumes_exactly(
    compose_train, dropout_teacher_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    """The corpus files streamed through a shuffle buffer, two epochs of 6 batches validated every 2 steps;
    SIGTERMed after step 7 (epoch 1, batch 1) and resumed from last.ckpt: it ends as the straight run."""
    overrides = [
        *stream_run(tmp_path, dropout_teacher_dir, corpus),
        *("distill.teacher_cache=none", "data.train_limit_blocks=12", "data.shuffle_buffer=4"),
        *("trainer.max_steps=10", "trainer.max_epochs=2", "trainer.val_check_interval=2"),
    ]
    train(compose_train(*overrides, *into(tmp_path / "straight")))
    run = tmp_path / "stopped"
    stop = [f"+callbacks.stop_at._target_={TermAt.__module__}.TermAt", "+callbacks.stop_at.step=7"]
    with pytest.raises(Interrupted):
        train(compose_train(*overrides, *into(run), *stop))
    last = run / "checkpoints" / "last.ckpt"
    state = loader_state(last)
    assert (state["epoch"], state["batches"]) == (1, 1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not resumable.*")
        train(compose_train(*overrides, *into(run), f"ckpt_path={last}"))
    assert_same_run(tmp_path / "straight", run)
