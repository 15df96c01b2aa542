"""GLUE-style sentence(-pair) classification as a LightningDataModule.

Local GLUE TSVs (``<data_dir>/<task>/{train,dev}.tsv``) are preferred; otherwise the task is
loaded from the hub (``nyu-mll/glue``). Tokenisation runs once through ``datasets.map`` and
is cached on disk under a key built from the data, the tokenizer and ``max_length``.
Batches are padded per batch. The dev split serves as validation and test set, because
GLUE's test labels are hidden.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
from filelock import FileLock
from torch.utils.data import DataLoader, DistributedSampler
from transformers import AutoTokenizer, DataCollatorWithPadding

from distill.data.augment import AugmentingCollator, AugmentSettings, build_augmenter
from distill.data.base import DataModule, check_max_length
from distill.data.resumable import ResumableLoader, replay_generator
from distill.data.sampler import LengthGroupedBatchSampler, data_parallel_rank
from distill.data.split_loaders import check_batch_sizes
from distill.data.tsv import check_labels, check_tsv_layout
from distill.utils.keys import EXAMPLE_INDEX, digest, tokenizer_fingerprint
from distill.utils.settings import settings_of

HUB_DATASET = "nyu-mll/glue"
SPLIT_FILES = {"train": "train.tsv", "validation": "dev.tsv"}


class GlueDataModule(DataModule):
    """Tokenised, dynamically padded GLUE classification data.

    Args:
        task: GLUE task name (``sst2``, ``rte``, ...): the folder under ``data_dir`` and the hub config.
        text_fields: one column (single sentence) or two (sentence pair) holding the text.
        label_field: column with the labels.
        num_labels: number of classes; integer labels must be in ``[0, num_labels)``.
        label_names: optional string label per class index, for TSVs that spell labels out.
        data_dir: folder holding ``<task>/train.tsv`` and ``<task>/dev.tsv``.
        cache_dir: where parsed and tokenised datasets are cached.
        tokenizer: tokenizer name or path (the teacher's).
        train_limit / val_limit: keep a random slice of train / the first rows of dev.
        group_by_length: draw training batches of similar lengths (far less padding, same epoch).
        augment: :class:`~distill.data.augment.AugmentSettings` (or their mapping); with ``copies >= 1``
            training batches also carry unlabelled, perturbed copies of their examples for the teacher.
    """

    def __init__(
        self,
        task: str,
        text_fields: list[str],
        data_dir: str,
        cache_dir: str,
        tokenizer: str,
        num_labels: int,
        label_field: str = "label",
        label_names: list[str] | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int = 128,
        num_workers: int = 0,
        train_limit: int | None = None,
        val_limit: int | None = None,
        seed: int = 0,
        group_by_length: bool = False,
        augment: AugmentSettings | None = None,
    ) -> None:
        super().__init__()
        self.check_settings(text_fields, max_length, batch_size, eval_batch_size)
        self.task = task
        self.text_fields = list(text_fields)
        self.label_field = label_field
        self.num_labels = num_labels
        self.label_names = list(label_names) if label_names else None
        self.data_dir = Path(data_dir).expanduser()
        self.cache_dir = Path(cache_dir).expanduser()
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.train_limit = train_limit
        self.val_limit = val_limit
        self.seed = seed
        self.group_by_length = group_by_length
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.tokenizer_key = tokenizer_fingerprint(self.tokenizer)
        pair_task = len(self.text_fields) == 2
        self.augmenter = build_augmenter(self.tokenizer, pair_task, settings_of(AugmentSettings, augment))
        self.splits: dict[str, datasets.Dataset] = {}
        # Lightning calls prepare_data/setup for every fit, validate and test; load and check once.
        self._tokenized: dict[str, datasets.Dataset] | None = None
        self._lengths: dict[str, list[int]] = {}

    @staticmethod
    def check_settings(text_fields: Sequence[str], max_length: int, batch_size: int, eval_batch_size: int) -> None:
        """The constructor's range checks, which :func:`distill.config.schemas.validate` also runs on ``data``."""
        if not 1 <= len(text_fields) <= 2:
            raise ValueError(f"text_fields={list(text_fields)!r} must name one or two columns")
        if max_length < 2:
            raise ValueError(f"max_length={max_length!r} must be >= 2")
        check_batch_sizes(batch_size, eval_batch_size)

    def local_files(self) -> dict[str, Path]:
        return {split: self.data_dir / self.task / name for split, name in SPLIT_FILES.items()}

    def _load_raw(self) -> datasets.DatasetDict:
        files = self.local_files()
        if all(path.is_file() for path in files.values()):
            return self._load_local(files)
        try:
            return datasets.load_dataset(HUB_DATASET, self.task, cache_dir=str(self.cache_dir / "raw"))
        except Exception as error:
            tried = ", ".join(str(path) for path in files.values())
            raise FileNotFoundError(
                f"No data for task {self.task!r}: the local files [{tried}] do not exist and loading "
                f"{HUB_DATASET!r}/{self.task} from the hub failed ({type(error).__name__}: {error}). "
                "Point DISTILL_DATA_DIR (or paths.data_dir=...) at a folder holding "
                f"{self.task}/train.tsv and {self.task}/dev.tsv, or go online (unset HF_HUB_OFFLINE, "
                "set HF_HOME to a writable cache)."
            ) from error

    def _load_local(self, files: dict[str, Path]) -> datasets.DatasetDict:
        columns = [*self.text_fields, self.label_field]
        for path in files.values():
            check_tsv_layout(path, columns)
        raw = datasets.load_dataset(
            "csv",
            data_files={split: str(path) for split, path in files.items()},
            delimiter="\t",
            quoting=csv.QUOTE_NONE,
            keep_default_na=False,
            cache_dir=str(self.cache_dir / "raw"),
        )
        return datasets.DatasetDict({split: self._encode_labels(ds, files[split]) for split, ds in raw.items()})

    def _encode_labels(self, ds: datasets.Dataset, path: Path) -> datasets.Dataset:
        labels = check_labels(ds[self.label_field], path, self.num_labels, self.label_names)
        return ds.remove_columns(self.label_field).add_column(self.label_field, labels)

    def _tokenize_batch(self, batch: dict) -> dict:
        texts = [batch[field] for field in self.text_fields]
        encoded = self.tokenizer(*texts, truncation=True, max_length=self.max_length)
        encoded["labels"] = batch[self.label_field]
        return encoded

    def _source_fingerprint(self, split: str, ds: datasets.Dataset) -> str:
        """Content hash of a local TSV (stable across loads); the hub copy's own fingerprint otherwise."""
        path = self.local_files()[split]
        if not path.is_file():
            return f"{HUB_DATASET}/{self.task}/{ds._fingerprint}"
        return hashlib.sha256(path.read_bytes()).hexdigest()

    def _cache_key(self, split: str, ds: datasets.Dataset) -> str:
        source = self._source_fingerprint(split, ds)
        spec = [source, self.label_names, self.tokenizer_key, self.max_length, self.text_fields]
        return f"{self.task}-{split}-{digest(spec)}"

    def _tokenize(self, raw: datasets.DatasetDict) -> dict[str, datasets.Dataset]:
        out_dir = self.cache_dir / "tokenized"
        out_dir.mkdir(parents=True, exist_ok=True)
        tokenized = {}
        for split, ds in raw.items():
            if split not in SPLIT_FILES:
                continue
            key = self._cache_key(split, ds)
            with FileLock(str(out_dir / f"{key}.lock")):
                tokenized[split] = ds.map(
                    self._tokenize_batch,
                    batched=True,
                    remove_columns=ds.column_names,
                    cache_file_name=str(out_dir / f"{key}.arrow"),
                    new_fingerprint=key,
                    desc=f"Tokenizing {self.task}/{split}",
                )
        return tokenized

    def _tokenized_splits(self) -> dict[str, datasets.Dataset]:
        if self._tokenized is None:
            self._tokenized = self._tokenize(self._load_raw())
        return self._tokenized

    def prepare_data(self) -> None:
        self._tokenized_splits()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        splits = self._tokenized_splits()
        train, validation = splits["train"], splits["validation"]
        if self.train_limit is not None:
            train = train.shuffle(seed=self.seed).select(range(min(self.train_limit, len(train))))
        if self.val_limit is not None:
            validation = validation.select(range(min(self.val_limit, len(validation))))
        # Batches carry each example's row so per-example stores (cached teacher logits) can be read.
        train = train.add_column(EXAMPLE_INDEX, list(range(len(train))))
        self.splits = {"train": train, "validation": validation}

    def teacher_key_fields(self) -> dict[str, Any]:
        return {
            "num_labels": self.num_labels,
            "tokenizer": self.tokenizer_key,
            "max_length": self.max_length,
            "train_limit": self.train_limit,
            "val_limit": self.val_limit,
            "group_by_length": self.group_by_length,
        }

    def check_context(self, max_positions: int) -> None:
        """Sentences are truncated to ``max_length`` tokens, which must fit the model's positions."""
        check_max_length(self.max_length, max_positions)

    def train_fingerprint(self) -> str:
        """Identity of the training examples as batches see them: source, tokenisation and slice."""
        self.setup("fit")
        raw_key = self._cache_key("train", self._tokenized_splits()["train"])
        spec = [
            raw_key,
            self.train_limit,
            self.seed if self.train_limit is not None else None,
            len(self.splits["train"]),
        ]
        return digest(spec)

    def dataloader(
        self, split: str, batch_size: int, shuffle: bool, augment: bool = False, shard: tuple[int, int] | None = None
    ) -> DataLoader:
        """A loader over ``split`` ("train" or "validation") after :meth:`setup`.

        ``augment`` adds the perturbed copies of ``augment=`` (the distillation loader only: the
        teacher's own fine-tuning and its logit pass read plain batches).

        Shuffled (training) loaders shard themselves across data-parallel ranks, so trainers run
        with ``use_distributed_sampler=False`` (see conf/trainer/ddp*.yaml); evaluation loaders are
        whole on every rank, which keeps accuracy exact (no padded duplicate examples). ``shard``
        (rank, number of ranks) replaces the attached trainer's: the teacher-logit store replays
        every rank's loader from one process. Training loaders resume mid-epoch from a checkpoint
        (:class:`~distill.data.resumable.ResumableLoader`).
        """
        dataset = self.splits[split]
        collate = DataCollatorWithPadding(self.tokenizer)
        rank, replicas = shard or data_parallel_rank(self)
        if augment and self.augmenter is not None:
            collate = AugmentingCollator(collate, self.tokenizer, self.augmenter, self.seed, rank)
        if not shuffle:
            return DataLoader(dataset, batch_size=batch_size, num_workers=self.num_workers, collate_fn=collate)
        options = dict(num_workers=self.num_workers, collate_fn=collate, generator=replay_generator(shard, self.seed))
        if self.group_by_length:
            if split not in self._lengths:
                self._lengths[split] = [len(ids) for ids in dataset["input_ids"]]
            sampler = LengthGroupedBatchSampler(
                self._lengths[split], batch_size, seed=self.seed, rank=rank, num_replicas=replicas
            )
            return ResumableLoader(dataset, batch_sampler=sampler, **options)
        # Seeded per epoch even in one process (not the global generator's order): a resumed epoch is the same.
        sampler = DistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=True, seed=self.seed)
        return ResumableLoader(dataset, batch_size=batch_size, sampler=sampler, **options)

    def train_dataloader(self) -> DataLoader:
        return self.resumable(self.dataloader("train", self.batch_size, shuffle=True, augment=True))

    def test_dataloader(self) -> DataLoader:
        # GLUE's test labels are hidden: the dev set is the test set.
        return self.val_dataloader()
