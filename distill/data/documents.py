"""Where a text corpus's documents come from, split by whole documents before any tokenisation.

Documents are the files ``<data_dir>/<pattern>``: a plain-text file is one document (one work per file), a
table (``.jsonl``/``.json``, ``.parquet``, ``.csv``, read by ``datasets``' own builders) holds one per row, in
its ``text_field`` column (a chat data module asks for the ``messages`` column instead). When no file matches
and ``hub_dataset`` is set, they are the rows of a ``datasets`` dataset's own ``train``/``validation``/``test``
splits. Local files are split by name: ``val_files`` and ``test_files`` are held out and every other matching
file is training, so no held-out text is ever trained on (a single table is split into files by the user, not
by row: a row split would move with every edit of the file). Each split comes with a key of its content, so
caches built from it follow the text and not the path.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pyarrow.compute as pc

from distill.utils.keys import digest

HELD_OUT = ("validation", "test")
SPLITS = ("train", *HELD_OUT)
TEXT_FEATURES = datasets.Features(text=datasets.Value("string"))
# The `datasets` builder of each table format; any other file is plain text, one document.
TABLE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitDocuments:
    """One split's documents before tokenisation: their names, their text (column ``text``: a string, or a
    conversation's messages for chat data) and a content key."""

    names: list[str]
    texts: datasets.Dataset
    source_key: str


@dataclass(frozen=True)
class DocumentSource:
    """The corpus's documents by split (see the module's contract); option names are the ``data.*`` keys."""

    data_dir: Path
    cache_dir: Path
    pattern: str = "*.txt"
    val_files: Sequence[str] = field(default_factory=list)
    test_files: Sequence[str] = field(default_factory=list)
    hub_dataset: str | None = None
    hub_config: str | None = None
    text_field: str = "text"
    # The data.* key that names the column, for the error on a row without it.
    field_option: str = "text_field"

    def load(self, splits: Sequence[str] = SPLITS) -> dict[str, SplitDocuments]:
        """The documents of ``splits`` (a streamed corpus reads only the held-out ones here)."""
        files = self._document_files()
        if files:
            return self._local_documents(files, splits)
        if self.hub_dataset is None:
            raise FileNotFoundError(self._missing_message())
        return self._hub_documents(splits)

    def stream(self) -> datasets.IterableDataset:
        """The training documents (column ``text``), read only as they are iterated (``data.streaming``)."""
        files = self._document_files()
        if not files and self.hub_dataset is None:
            raise FileNotFoundError(self._missing_message())
        if not files:
            rows = datasets.load_dataset(self.hub_dataset, self.hub_config, split="train", streaming=True)
            return self._text_column(rows, self.text_field)
        paths = [str(files[name]) for name in self._split_membership(list(files))["train"]]
        builders = sorted({TABLE_BUILDERS.get(Path(path).suffix.lower(), "text") for path in paths})
        if len(builders) > 1:
            raise ValueError(
                f"data.streaming=true reads the training files with one `datasets` builder and data.pattern="
                f"{self.pattern!r} matches files of several kinds ({builders}): narrow data.pattern"
            )
        if builders == ["text"]:  # a plain-text file is one document, in the text builder's `text` column
            return datasets.load_dataset("text", data_files=paths, split="train", streaming=True, sample_by="document")
        rows = datasets.load_dataset(builders[0], data_files=paths, split="train", streaming=True)
        return self._text_column(rows, self.text_field)

    @staticmethod
    def _text_column(rows: datasets.IterableDataset, column: str) -> datasets.IterableDataset:
        rows = rows.select_columns([column])
        return rows if column == "text" else rows.rename_column(column, "text")

    def _document_files(self) -> dict[str, Path]:
        if not self.data_dir.is_dir():
            return {}
        files = sorted(path for path in self.data_dir.glob(self.pattern) if path.is_file())
        return {path.relative_to(self.data_dir).as_posix(): path for path in files}

    def _missing_message(self, hub_failure: str = "") -> str:
        hub = f"data.hub_dataset={self.hub_dataset!r} {hub_failure}" if self.hub_dataset else "no data.hub_dataset"
        return (
            f"No documents: no file in {self.data_dir} matches data.pattern={self.pattern!r} and {hub}. "
            "Point DISTILL_DATA_DIR (or paths.data_dir=...) at the folder holding the corpus, fix data.pattern, "
            "or set data.hub_dataset to a `datasets` name (online: unset HF_HUB_OFFLINE)."
        )

    def _split_membership(self, names: list[str]) -> dict[str, list[str]]:
        """Each split's document names, in ``names`` order; checks the held-out lists against ``names``."""
        for option, wanted in (("val_files", self.val_files), ("test_files", self.test_files)):
            unknown = [name for name in wanted if name not in names]
            if unknown:
                raise ValueError(
                    f"data.{option} names {unknown[0]!r}, which is not one of the {len(names)} files matching "
                    f"{self.pattern!r} in {self.data_dir} (e.g. {', '.join(names[:5])})"
                )
        both = sorted(set(self.val_files) & set(self.test_files))
        if both:
            raise ValueError(f"{both[0]!r} is in both data.val_files and data.test_files: hold a document out once")
        held_out = set(self.val_files) | set(self.test_files)
        membership = {
            "train": [name for name in names if name not in held_out],
            "validation": [name for name in names if name in self.val_files],
            "test": [name for name in names if name in self.test_files],
        }
        if not membership["train"]:
            raise ValueError(
                f"all {len(names)} files matching {self.pattern!r} in {self.data_dir} are in data.val_files or "
                "data.test_files: leave at least one for training"
            )
        return membership

    def _local_documents(self, files: dict[str, Path], splits: Sequence[str]) -> dict[str, SplitDocuments]:
        documents = {}
        for split, names in self._split_membership(list(files)).items():
            if split not in splits:
                continue
            loaded = [self._file_documents(name, files[name]) for name in names]
            row_names = [row for rows, _, _ in loaded for row in rows]
            empty = datasets.Dataset.from_dict({"text": []}, features=TEXT_FEATURES)
            texts = datasets.concatenate_datasets([table for _, table, _ in loaded]) if loaded else empty
            source = list(zip(names, [content_hash for _, _, content_hash in loaded], strict=True))
            if any(path.suffix.lower() in TABLE_BUILDERS for path in files.values()):
                source.append(self.text_field)  # plain-text corpora keep the keys of their existing caches
            documents[split] = SplitDocuments(row_names, texts, digest(source))
        return documents

    def _file_documents(self, name: str, path: Path) -> tuple[list[str], datasets.Dataset, str]:
        """A file's document names, their ``text`` column and its content's hash."""
        content = path.read_bytes()
        content_hash = hashlib.sha256(content).hexdigest()
        builder = TABLE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            text = datasets.Dataset.from_dict({"text": [_decode(path, content)]}, features=TEXT_FEATURES)
            return [name], text, content_hash
        raw = str(self.cache_dir / "raw")
        rows = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=raw)
        texts = self.document_column(rows, str(path))
        return [f"{name}#{row}" for row in range(len(texts))], texts, content_hash

    def document_column(self, rows: datasets.Dataset, where: str) -> datasets.Dataset:
        """``rows``' ``text_field`` column as ``text``; a row without it is an error naming ``where`` and the row."""
        missing = 0
        if self.text_field in rows.column_names:
            nulls = pc.is_null(rows.data.column(self.text_field)).to_numpy(zero_copy_only=False)
            missing = int(nulls.argmax()) if nulls.any() else None
        if missing is not None:
            raise ValueError(
                f"{where} row {missing + 1} has no {self.text_field!r} column (its columns: {rows.column_names}): "
                f"set data.{self.field_option}=<the column holding each document>"
            )
        texts = rows.select_columns([self.text_field])
        return texts if self.text_field == "text" else texts.rename_column(self.text_field, "text")

    def _hub_documents(self, splits: Sequence[str]) -> dict[str, SplitDocuments]:
        try:
            raw = self._hub_splits(splits)
        except Exception as error:
            failure = f"failed to load ({type(error).__name__}: {error})"
            raise FileNotFoundError(self._missing_message(failure)) from error
        missing = [split for split in splits if split not in raw]
        if missing:
            raise ValueError(f"data.hub_dataset={self.hub_dataset!r} lacks the split(s) {missing} (it has {list(raw)})")
        if self.val_files or self.test_files:
            log.warning("data.val_files/test_files name local files: %s's own splits are used", self.hub_dataset)
        return {split: self._hub_split(split, *raw[split]) for split in splits}

    def _hub_splits(self, splits: Sequence[str]) -> dict[str, tuple[datasets.Dataset, str]]:
        """Each split's rows and their fingerprint. Without ``train`` (a streamed corpus), the held-out splits are
        read through a stream, so the training split is never downloaded."""
        if "train" in splits:
            raw = datasets.load_dataset(self.hub_dataset, self.hub_config, cache_dir=str(self.cache_dir / "raw"))
            return {split: (rows, rows._fingerprint) for split, rows in raw.items()}
        streams = datasets.load_dataset(self.hub_dataset, self.hub_config, streaming=True)
        held_out = {split: list(streams[split]) for split in splits if split in streams}
        return {split: (datasets.Dataset.from_list(rows), digest(rows)) for split, rows in held_out.items()}

    def _hub_split(self, split: str, rows: datasets.Dataset, fingerprint: str) -> SplitDocuments:
        texts = self.document_column(rows, f"data.hub_dataset={self.hub_dataset!r} split {split!r}")
        names = [f"{self.hub_dataset}/{split}/{row}" for row in range(len(rows))]
        source = [self.hub_dataset, self.hub_config, split, self.text_field, fingerprint]
        return SplitDocuments(names, texts, digest(source))


def _decode(path: Path, content: bytes) -> str:
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error})") from error
