"""GlueDataModule: TSV parsing with quotes, bad rows and labels, missing data, tokenisation cache."""

from __future__ import annotations

from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest

from distill.data.glue import GlueDataModule

ROWS = [
    ('a "quoted" word , and an apostrophe \'s', "1"),
    ("it 's neither good nor bad", "0"),
    ("NA", "1"),
    ("a film with 'single quotes", "0"),
]


def write_task(root: Path, train_rows=ROWS, dev_rows=ROWS, header="sentence\tlabel") -> Path:
    task = root / "sst2"
    task.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.tsv", train_rows), ("dev.tsv", dev_rows)):
        lines = [header, *("\t".join(row) for row in rows)]
        (task / name).write_text("\n".join(lines) + "\n")
    return root


def make_module(data_dir: Path, cache_dir: Path, tokenizer: str, **overrides) -> GlueDataModule:
    settings = dict(
        task="sst2",
        text_fields=["sentence"],
        data_dir=str(data_dir),
        cache_dir=str(cache_dir),
        tokenizer=tokenizer,
        num_labels=2,
        batch_size=2,
        eval_batch_size=2,
    )
    settings.update(overrides)
    return GlueDataModule(**settings)


def test_literal_quotes_survive_parsing(tmp_path: Path, hf_teacher_available: str) -> None:
    module = make_module(write_task(tmp_path / "data"), tmp_path / "cache", hf_teacher_available)
    module.setup("fit")
    train = module.splits["train"]
    assert len(train) == len(ROWS)
    decoded = [module.tokenizer.decode(ids, skip_special_tokens=True) for ids in train["input_ids"]]
    assert '"' in decoded[0] and "'" in decoded[3]
    # "NA" is text, not a missing value.
    assert decoded[2] == "na"
    assert train["labels"] == [1, 0, 1, 0]


def test_batches_are_padded_per_batch(tmp_path: Path, hf_teacher_available: str) -> None:
    module = make_module(write_task(tmp_path / "data"), tmp_path / "cache", hf_teacher_available)
    module.setup("fit")
    batch = next(iter(module.val_dataloader()))
    longest = max(len(ids) for ids in module.splits["validation"]["input_ids"][:2])
    assert batch["input_ids"].shape == (2, longest)
    assert set(batch) >= {"input_ids", "attention_mask", "labels"}


def test_wrong_column_count_names_file_and_line(tmp_path: Path, hf_teacher_available: str) -> None:
    data_dir = write_task(tmp_path / "data", train_rows=[ROWS[0], ("too\tmany", "1")])
    module = make_module(data_dir, tmp_path / "cache", hf_teacher_available)
    with pytest.raises(ValueError, match=r"sst2/train\.tsv:3: expected 2 tab-separated columns .* found 3"):
        module.setup("fit")


def test_label_outside_label_set_is_named(tmp_path: Path, hf_teacher_available: str) -> None:
    data_dir = write_task(tmp_path / "data", dev_rows=[ROWS[0], ("fine", "2")])
    module = make_module(data_dir, tmp_path / "cache", hf_teacher_available)
    with pytest.raises(ValueError, match=r"sst2/dev\.tsv:3: label 2 is not in the task's label set"):
        module.setup("fit")


def test_missing_data_offline_names_paths_and_env_vars(
    tmp_path: Path, hf_teacher_available: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    module = make_module(tmp_path / "nowhere", tmp_path / "cache", hf_teacher_available)
    with pytest.raises(FileNotFoundError) as error:
        module.setup("fit")
    message = str(error.value)
    assert str(tmp_path / "nowhere" / "sst2" / "train.tsv") in message
    assert "DISTILL_DATA_DIR" in message and "HF_HUB_OFFLINE" in message


def tokenized_files(cache_dir: Path) -> set[str]:
    return {path.name for path in (cache_dir / "tokenized").glob("*.arrow")}


def test_tokenisation_is_cached_and_keyed_by_max_length(tmp_path: Path, hf_teacher_available: str) -> None:
    data_dir, cache_dir = write_task(tmp_path / "data"), tmp_path / "cache"
    make_module(data_dir, cache_dir, hf_teacher_available).setup("fit")
    first = tokenized_files(cache_dir)
    assert len(first) == 2
    again = make_module(data_dir, cache_dir, hf_teacher_available)
    again.setup("fit")
    assert tokenized_files(cache_dir) == first
    assert again.splits["train"].cache_files[0]["filename"].endswith(tuple(first))
    make_module(data_dir, cache_dir, hf_teacher_available, max_length=8).setup("fit")
    assert len(tokenized_files(cache_dir)) == 4


def test_real_sst2_sizes_and_slices(tmp_path: Path, data_dir: Path, hf_teacher_available: str) -> None:
    module = make_module(data_dir, tmp_path / "cache", hf_teacher_available, train_limit=100, val_limit=10)
    module.setup("fit")
    assert len(module.splits["train"]) == 100
    assert module.splits["validation"]["labels"][:10] == module.splits["validation"]["labels"]
    full = make_module(data_dir, tmp_path / "cache", hf_teacher_available)
    full.setup("fit")
    assert len(full.splits["train"]) == 67_349 and len(full.splits["validation"]) == 872
    assert sum(full.splits["validation"]["labels"]) == 444
