"""GlueDataModule: TSV parsing with quotes, bad rows and labels, missing data, tokenisation cache."""

from __future__ import annotations

from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest

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


def test_literal_quotes_survive_parsing(tmp_path: Path, glue_module) -> None:
    module = glue_module(write_task(tmp_path / "data"), tmp_path / "cache")
    module.setup("fit")
    train = module.splits["train"]
    assert len(train) == len(ROWS)
    decoded = [module.tokenizer.decode(ids, skip_special_tokens=True) for ids in train["input_ids"]]
    assert '"' in decoded[0] and "'" in decoded[3]
    # "NA" is text, not a missing value.
    assert decoded[2] == "na"
    assert train["labels"] == [1, 0, 1, 0]


def test_batches_are_padded_per_batch(tmp_path: Path, glue_module) -> None:
    module = glue_module(write_task(tmp_path / "data"), tmp_path / "cache")
    module.setup("fit")
    batch = next(iter(module.val_dataloader()))
    longest = max(len(ids) for ids in module.splits["validation"]["input_ids"][:2])
    assert batch["input_ids"].shape == (2, longest)
    assert set(batch) >= {"input_ids", "attention_mask", "labels"}


def test_wrong_column_count_names_file_and_line(tmp_path: Path, glue_module) -> None:
    data_dir = write_task(tmp_path / "data", train_rows=[ROWS[0], ("too\tmany", "1")])
    module = glue_module(data_dir, tmp_path / "cache")
    with pytest.raises(ValueError, match=r"sst2/train\.tsv:3: expected 2 tab-separated columns .* found 3"):
        module.setup("fit")


def test_label_outside_label_set_is_named(tmp_path: Path, glue_module) -> None:
    data_dir = write_task(tmp_path / "data", dev_rows=[ROWS[0], ("fine", "2")])
    module = glue_module(data_dir, tmp_path / "cache")
    with pytest.raises(ValueError, match=r"sst2/dev\.tsv:3: label 2 is not in the task's label set"):
        module.setup("fit")


def test_missing_data_offline_names_paths_and_env_vars(
    tmp_path: Path, glue_module, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    module = glue_module(tmp_path / "nowhere", tmp_path / "cache")
    with pytest.raises(FileNotFoundError) as error:
        module.setup("fit")
    message = str(error.value)
    assert str(tmp_path / "nowhere" / "sst2" / "train.tsv") in message
    assert "DISTILL_DATA_DIR" in message and "HF_HUB_OFFLINE" in message


def tokenized_files(cache_dir: Path) -> set[str]:
    return {path.name for path in (cache_dir / "tokenized").glob("*.arrow")}


def test_tokenisation_is_cached_and_keyed_by_max_length(tmp_path: Path, glue_module) -> None:
    data_dir, cache_dir = write_task(tmp_path / "data"), tmp_path / "cache"
    glue_module(data_dir, cache_dir).setup("fit")
    first = tokenized_files(cache_dir)
    assert len(first) == 2
    again = glue_module(data_dir, cache_dir)
    again.setup("fit")
    assert tokenized_files(cache_dir) == first
    assert again.splits["train"].cache_files[0]["filename"].endswith(tuple(first))
    glue_module(data_dir, cache_dir, max_length=8).setup("fit")
    assert len(tokenized_files(cache_dir)) == 4


@pytest.mark.slow
def test_real_sst2_sizes_and_slices(tmp_path: Path, data_dir: Path, glue_module) -> None:
    module = glue_module(data_dir, tmp_path / "cache", train_limit=100, val_limit=10)
    module.setup("fit")
    assert len(module.splits["train"]) == 100
    assert module.splits["validation"]["labels"][:10] == module.splits["validation"]["labels"]
    full = glue_module(data_dir, tmp_path / "cache")
    full.setup("fit")
    assert len(full.splits["train"]) == 67_349 and len(full.splits["validation"]) == 872
    assert sum(full.splits["validation"]["labels"]) == 444


def test_files_are_loaded_and_checked_once_per_module(
    tmp_path: Path, glue_module, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = glue_module(write_task(tmp_path / "data"), tmp_path / "cache", group_by_length=True)
    loads = []
    original = module._load_raw
    monkeypatch.setattr(module, "_load_raw", lambda: loads.append(1) or original())
    # What the teacher stage and then Trainer.fit / Trainer.test call, in order.
    for _ in range(3):
        module.prepare_data()
        module.setup("fit")
        module.train_dataloader()
    assert loads == [1]
