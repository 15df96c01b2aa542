"""TextDataModule: document splits, block packing, held-out padding, the token cache, errors, sharding."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from distill.data.text import IGNORE_INDEX, TextDataModule
from distill.utils.keys import EXAMPLE_INDEX
from tests.conftest import require

PANGRAM = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches"
WORDS = PANGRAM.split()
# Five documents of different lengths and word orders.
CORPUS = {f"{name}.txt": " ".join(WORDS[3 * i :] + WORDS[: 5 + 4 * i]) for i, name in enumerate("abcde")}
HELD_OUT = {"val_files": ["b.txt"], "test_files": ["d.txt", "e.txt"]}


def write_corpus(folder: Path, corpus: dict[str, str] = CORPUS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in corpus.items():
        (folder / name).write_text(text)
    (folder / "README.md").write_text("not a document")
    return folder


@pytest.fixture
def text_module(tmp_path: Path, hf_teacher_available: str) -> Callable[..., TextDataModule]:
    """text_module(**overrides): a module over the tiny corpus in tmp_path/corpus with the BERT tokenizer."""

    def _make(**overrides) -> TextDataModule:
        settings = dict(
            data_dir=str(write_corpus(tmp_path / "corpus")),
            cache_dir=str(tmp_path / "cache"),
            tokenizer=hf_teacher_available,
            block_size=8,
            batch_size=4,
            eval_batch_size=3,
            **HELD_OUT,
        )
        return TextDataModule(**{**settings, **overrides})

    return _make


def document_stream(module: TextDataModule, names: list[str], prefix: Sequence[int] = ()) -> list[int]:
    """The documents' tokens as the contract states: [BOS] text separator, concatenated."""
    stream = []
    for name in names:
        ids = module.tokenizer((module.source.data_dir / name).read_text(), add_special_tokens=False)["input_ids"]
        stream += [*prefix, *ids, module.separator_id]
    return stream


def blocks(module: TextDataModule, split: str) -> dict[str, torch.Tensor]:
    """All blocks of ``split`` as batch-shaped tensors."""
    return module.splits[split][:]


def test_splits_are_whole_documents_and_disjoint(text_module) -> None:
    module = text_module()
    splits = {split: module.documents(split) for split in ("train", "validation", "test")}
    assert splits == {"train": ["a.txt", "c.txt"], "validation": ["b.txt"], "test": ["d.txt", "e.txt"]}
    module.setup("fit")
    for split, names in splits.items():
        real = blocks(module, split)["input_ids"][blocks(module, split)["attention_mask"] == 1]
        assert real.tolist() == document_stream(module, names)[: len(real)]
    assert module.task == "causal_lm" and module.vocab_size == len(module.tokenizer)


def test_training_blocks_pack_the_stream_and_drop_the_tail(text_module) -> None:
    module = text_module()
    module.setup("fit")
    train = blocks(module, "train")
    stream = document_stream(module, ["a.txt", "c.txt"])
    assert len(stream) % 8 != 0, "the corpus should leave a partial block to drop"
    count = len(module.splits["train"])
    assert count == len(stream) // 8 and train["input_ids"].shape == (count, 8)
    assert train["input_ids"].reshape(-1).tolist() == stream[: count * 8]
    assert torch.equal(train["labels"], train["input_ids"])
    assert bool((train["attention_mask"] == 1).all())
    assert train[EXAMPLE_INDEX].tolist() == list(range(count))
    assert module.num_tokens("train") == count * 8


def test_every_held_out_token_is_counted_once(text_module) -> None:
    module = text_module()
    module.setup("validate")
    for split, names in (("validation", ["b.txt"]), ("test", ["d.txt", "e.txt"])):
        stream = document_stream(module, names)
        assert len(stream) % 8 != 0, "the corpus should leave a partial block to pad"
        batches = list(module.dataloader(split, 3, shuffle=False))
        labels = torch.cat([batch["labels"] for batch in batches])
        assert labels.shape == (-(-len(stream) // 8), 8)
        assert labels[labels != IGNORE_INDEX].tolist() == stream
        last = batches[-1]
        padding = last["attention_mask"][-1] == 0
        assert int(padding.sum()) == 8 - len(stream) % 8 and bool(padding[-1])
        assert bool((last["input_ids"][-1][padding] == module.pad_id).all())
        assert bool((last["labels"][-1][padding] == IGNORE_INDEX).all())
        assert module.num_tokens(split) == len(stream) == sum(int(b["attention_mask"].sum()) for b in batches)
        assert EXAMPLE_INDEX not in last


def test_documents_start_with_bos_when_asked(tmp_path: Path, text_module, hf_teacher_available: str) -> None:
    with_bos = tmp_path / "tokenizer_with_bos"
    AutoTokenizer.from_pretrained(hf_teacher_available, bos_token="[CLS]").save_pretrained(with_bos)
    module = text_module(tokenizer=str(with_bos), add_bos=True)
    module.setup("validate")
    labels = blocks(module, "validation")["labels"]
    assert module.bos_id == module.tokenizer.cls_token_id
    assert labels[labels != IGNORE_INDEX].tolist() == document_stream(module, ["b.txt"], prefix=[module.bos_id])


def raise_if_called(*args, **kwargs):
    raise AssertionError("the tokenizer ran although its output is cached")


def tokenized_files(module: TextDataModule) -> set[str]:
    return {path.name for path in (module.cache_dir / "tokenized").glob("*.arrow")}


def test_tokens_are_cached_by_content_and_reused(text_module, monkeypatch: pytest.MonkeyPatch) -> None:
    first = text_module()
    first.setup("fit")
    cached, validation = tokenized_files(first), document_stream(first, ["b.txt"])
    assert len(cached) == 3
    again = text_module(block_size=5)
    monkeypatch.setattr(type(again.tokenizer), "__call__", raise_if_called)
    again.setup("fit")
    assert tokenized_files(again) == cached
    labels = blocks(again, "validation")["labels"]
    assert labels[labels != IGNORE_INDEX].tolist() == validation
    edited = text_module()
    (edited.source.data_dir / "a.txt").write_text("edited text")
    with pytest.raises(AssertionError, match="the tokenizer ran"):
        edited.setup("fit")


def test_seeded_training_slice_and_first_held_out_blocks(text_module) -> None:
    full, sliced = text_module(), text_module(train_limit_blocks=3, val_limit_blocks=2, test_limit_blocks=1)
    full.setup("fit")
    sliced.setup("fit")
    assert (len(sliced.splits["train"]), len(sliced.splits["validation"]), len(sliced.splits["test"])) == (3, 2, 1)
    full_blocks, sliced_blocks = (blocks(module, "train")["input_ids"].tolist() for module in (full, sliced))
    assert all(block in full_blocks for block in sliced_blocks) and sliced_blocks != full_blocks[:3]
    assert blocks(sliced, "train")[EXAMPLE_INDEX].tolist() == [0, 1, 2]
    assert torch.equal(blocks(sliced, "validation")["input_ids"], blocks(full, "validation")["input_ids"][:2])
    same = text_module(train_limit_blocks=3)
    assert same.train_fingerprint() == sliced.train_fingerprint() != full.train_fingerprint()
    assert text_module(train_limit_blocks=3, slice_seed=1).train_fingerprint() != sliced.train_fingerprint()
    # The run's seed orders batches only: every seed trains on the same slice (and shares its store).
    assert text_module(train_limit_blocks=3, seed=1).train_fingerprint() == sliced.train_fingerprint()
    assert text_module(block_size=5).train_fingerprint() != full.train_fingerprint()


def shuffled_order(module: TextDataModule, epoch: int = 0, shard: tuple[int, int] | None = None) -> list[int]:
    module.setup("fit")
    loader = module.dataloader("train", 4, shuffle=True, shard=shard)
    loader.sampler.set_epoch(epoch)
    return torch.cat([batch[EXAMPLE_INDEX] for batch in loader]).tolist()


def test_shuffling_is_set_by_seed_and_epoch(text_module) -> None:
    module = text_module(block_size=2)
    order = shuffled_order(module)
    assert sorted(order) == list(range(len(module.splits["train"]))) and len(order) >= 20
    assert order != sorted(order)
    assert shuffled_order(text_module(block_size=2)) == order
    assert shuffled_order(text_module(block_size=2, seed=1)) != order
    assert shuffled_order(module, epoch=1) != order


def test_data_parallel_ranks_draw_disjoint_blocks(text_module) -> None:
    module = text_module(block_size=2)
    ranks = [shuffled_order(module, shard=(rank, 2)) for rank in range(2)]
    count = len(module.splits["train"])
    assert len(ranks[0]) == len(ranks[1]) == count // 2
    assert not set(ranks[0]) & set(ranks[1])
    assert len(set(ranks[0]) | set(ranks[1])) == count - count % 2


def test_prompts_are_the_starts_of_evenly_spaced_held_out_blocks(text_module) -> None:
    module = text_module()
    module.setup("test")
    test_ids = blocks(module, "test")["input_ids"]
    rows = [0, len(test_ids) // 3, 2 * len(test_ids) // 3]
    expected = [module.tokenizer.decode(test_ids[row][:4], skip_special_tokens=True) for row in rows]
    assert module.prompts("test", 3, 4) == expected
    with pytest.raises(ValueError, match="split='train'"):
        module.prompts("train", 1, 4)
    with pytest.raises(ValueError, match="length=9"):
        module.prompts("test", 1, 9)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (
            {"pattern": "*.rst"},
            FileNotFoundError,
            r"no file in .*corpus matches data.pattern='\*.rst'.*DISTILL_DATA_DIR",
        ),
        ({"val_files": ["hamlet.txt"]}, ValueError, r"data.val_files names 'hamlet.txt'.*\(e.g. a.txt, b.txt, c.txt"),
        ({"test_files": ["b.txt"]}, ValueError, r"'b.txt' is in both data.val_files and data.test_files"),
        ({"test_files": ["a.txt", "c.txt", "d.txt", "e.txt"]}, ValueError, r"leave at least one for training"),
    ],
)
def test_bad_corpus_settings_are_named(text_module, overrides: dict, error: type[Exception], message: str) -> None:
    module = text_module(**overrides)
    with pytest.raises(error, match=message):
        module.setup("fit")


def test_empty_folder_names_folder_pattern_and_fix(tmp_path: Path, text_module) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as error:
        text_module(data_dir=str(empty)).setup("fit")
    message = str(error.value)
    assert str(empty) in message and "'*.txt'" in message
    assert "DISTILL_DATA_DIR" in message and "paths.data_dir" in message and "data.hub_dataset" in message


def test_block_size_above_the_context_is_refused(text_module) -> None:
    module = text_module(block_size=64)
    module.check_context(64)
    with pytest.raises(ValueError, match=r"data.block_size=64 exceeds the model's context length of 32"):
        module.check_context(32)
    with pytest.raises(ValueError, match=r"^train_limit_blocks=0 must be a positive number"):
        text_module(train_limit_blocks=0)


def test_hub_dataset_splits_are_used_when_no_file_matches(tmp_path: Path, text_module) -> None:
    hub = tmp_path / "hub"
    hub.mkdir()
    for split, names in (("train", "ac"), ("validation", "b"), ("test", "de")):
        rows = [json.dumps({"content": CORPUS[f"{name}.txt"]}) for name in names]
        (hub / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    module = text_module(pattern="*.none", hub_dataset=str(hub), text_field="content", val_files=[], test_files=[])
    module.setup("fit")
    assert module.documents("test") == [f"{hub}/test/0", f"{hub}/test/1"]
    labels = blocks(module, "validation")["labels"]
    assert labels[labels != IGNORE_INDEX].tolist() == document_stream(module, ["b.txt"])


@pytest.fixture
def shakespeare(tmp_path: Path, hf_teacher_available: str) -> TextDataModule:
    folder = Path(os.environ.get("DISTILL_DATA_DIR", "data")) / "shakespeare"
    require((folder / "hamlet_gut.txt").is_file(), f"no Shakespeare corpus under {folder} (set DISTILL_DATA_DIR)")
    return TextDataModule(
        data_dir=str(folder),
        cache_dir=str(tmp_path / "cache"),
        tokenizer=hf_teacher_available,
        pattern="*_gut.txt",
        val_files=["hamlet_gut.txt"],
        test_files=["macbeth_gut.txt", "sonnets_gut.txt"],
        block_size=64,
    )


def test_shakespeare_splits_by_work(shakespeare: TextDataModule) -> None:
    train = shakespeare.documents("train")
    assert len(train) == 39 and all(name.endswith("_gut.txt") for name in train)
    assert "hamlet_gut.txt" not in train and "macbeth_gut.txt" not in train
    assert shakespeare.documents("validation") == ["hamlet_gut.txt"]
    assert shakespeare.documents("test") == ["macbeth_gut.txt", "sonnets_gut.txt"]


@pytest.mark.slow
def test_shakespeare_block_counts(shakespeare: TextDataModule) -> None:
    module = shakespeare
    module.setup("fit")
    assert len(module.splits["train"]) == module.num_tokens("train") // 64
    for split in ("validation", "test"):
        assert len(module.splits[split]) == -(-module.num_tokens(split) // 64)
    assert 30_000 < module.num_tokens("validation") < 60_000
