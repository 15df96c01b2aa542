"""Plain-text corpora for causal language modelling as a LightningDataModule.

Contract:

* Documents and their splits come from :class:`~distill.data.documents.DocumentSource`: whole files
  (one work per file) split by name, so no held-out text is ever trained on, or a hub dataset's own splits.
* Each document is tokenised once, without the tokenizer's special tokens, as ``[BOS] text EOS`` (BOS only
  with ``add_bos`` and a tokenizer that has one; a tokenizer without EOS, like BERT's, ends documents with
  its SEP). A split's tokenised documents are cached under ``<cache_dir>/tokenized`` keyed by the content of
  the documents read, the split's membership and the tokenizer, so later processes skip the tokenizer.
* A split's token stream (its documents in order) is cut into non-overlapping blocks of ``block_size``
  tokens with ``labels == input_ids`` (the model shifts them, as in HF). Training drops the last partial
  block; validation and test pad it (pad id, ``attention_mask`` 0, labels -100), so every held-out token
  lies in exactly one block: the windows of non-overlapping perplexity.
* With ``streaming`` (or a ``train_stream``) the training documents are never materialized: they are read,
  tokenised and packed as the loader asks (:mod:`distill.data.streaming`); the held-out splits are as above.
  A stream has no fixed set of blocks to key a teacher-logit store by: it trains with the live teacher.
* Training batches carry :data:`~distill.utils.keys.EXAMPLE_INDEX` (the block's row of the train split).
  Shuffled loaders shard themselves across data-parallel ranks (trainers run with
  ``use_distributed_sampler=False``); evaluation loaders are whole on every rank.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
from filelock import FileLock
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from distill.data.base import DataModule
from distill.data.documents import HELD_OUT, SPLITS, DocumentSource, SplitDocuments
from distill.data.sampler import data_parallel_rank
from distill.data.split_loaders import check_batch_sizes
from distill.data.streaming import PackedStream, StreamLoader, lightning_read_ahead
from distill.utils.keys import EXAMPLE_INDEX, digest, tokenizer_fingerprint
from distill.utils.references import load_tokenizer

IGNORE_INDEX = -100
TOKEN_FEATURES = datasets.Features(input_ids=datasets.Sequence(datasets.Value("int32")))
BLOCK_FEATURES = datasets.Features(
    {name: datasets.Sequence(datasets.Value("int64")) for name in ("input_ids", "attention_mask", "labels")}
)

log = logging.getLogger(__name__)


def document_separator(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that ends every document: EOS, else SEP (encoder tokenizers such as BERT's have no EOS)."""
    for token_id in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if token_id is not None:
            return token_id
    raise ValueError(f"tokenizer {tokenizer.name_or_path!r} defines neither an EOS nor a SEP token to end documents")


def token_stream(tokenized: datasets.Dataset) -> np.ndarray:
    """The ``input_ids`` of all rows of ``tokenized``, concatenated in row order."""
    if len(tokenized) == 0:
        return np.zeros(0, dtype=np.int64)
    return pc.list_flatten(tokenized.data.column("input_ids")).to_numpy().astype(np.int64)


def pack_blocks(stream: np.ndarray, block_size: int, pad_id: int, keep_tail: bool) -> dict[str, np.ndarray]:
    """Non-overlapping ``block_size`` windows of ``stream``; ``keep_tail`` pads the last partial window
    (attention 0, label -100) instead of dropping it."""
    count = -(-len(stream) // block_size) if keep_tail else len(stream) // block_size
    input_ids = np.full((count, block_size), pad_id, dtype=np.int64)
    attention_mask = np.zeros((count, block_size), dtype=np.int64)
    used = min(len(stream), count * block_size)
    input_ids.reshape(-1)[:used] = stream[:used]
    attention_mask.reshape(-1)[:used] = 1
    labels = np.where(attention_mask == 1, input_ids, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def check_limit(option: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{option}={value!r} must be a positive number of blocks or null (all)")


class TextDataModule(DataModule):
    """Causal-LM blocks of a plain-text corpus split by whole documents.

    Args:
        data_dir: folder of plain-text files, one document per file.
        cache_dir: where tokenised documents (and hub downloads) are cached.
        tokenizer: tokenizer name, local folder or GGUF reference (the teacher's).
        val_files / test_files: file names (relative to ``data_dir``) of the validation / test documents.
        pattern: glob selecting the documents in ``data_dir``.
        hub_dataset / hub_config / text_field: a ``datasets`` dataset (and its config) whose ``text_field``
            rows are the documents, used only when no file matches ``pattern``.
        block_size: tokens per block (at most the model's context length: see :meth:`check_context`).
        add_bos: start every document with the tokenizer's BOS token, if it has one.
        train_limit_blocks: keep a random slice of this many training blocks, drawn with ``slice_seed``
            (apart from ``seed``, which orders the batches: runs of several seeds train on one slice
            and share its teacher store).
        val_limit_blocks / test_limit_blocks: keep the first blocks of validation / test.
        streaming: read the training documents as they are trained on (``train_limit_blocks``: the first ones).
        train_stream: (from code) the training documents as an iterable of ``{"text": ...}`` rows, such as a
            ``datasets.IterableDataset``; implies ``streaming``.
        shuffle_buffer: a streamed corpus's blocks pass through a shuffle buffer of this many blocks, drawn
            with ``seed`` and the epoch; 0 or None: the stream's order. (A materialized corpus is shuffled whole.)
    """

    task = "causal_lm"
    # The held-out references are the text's true continuations, not the teacher's.
    references_are_teachers = False

    def __init__(
        self,
        data_dir: str,
        cache_dir: str,
        tokenizer: str,
        val_files: Sequence[str] = (),
        test_files: Sequence[str] = (),
        pattern: str = "*.txt",
        hub_dataset: str | None = None,
        hub_config: str | None = None,
        text_field: str = "text",
        block_size: int = 512,
        batch_size: int = 8,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        slice_seed: int = 0,
        add_bos: bool = False,
        train_limit_blocks: int | None = None,
        val_limit_blocks: int | None = None,
        test_limit_blocks: int | None = None,
        streaming: bool = False,
        train_stream: Iterable[dict[str, str]] | None = None,
        shuffle_buffer: int | None = None,
    ) -> None:
        super().__init__()
        self.streaming, self.train_stream = streaming or train_stream is not None, train_stream
        limits = (train_limit_blocks, val_limit_blocks, test_limit_blocks)
        self.check_settings(block_size, batch_size, eval_batch_size, *limits, shuffle_buffer)
        self.shuffle_buffer = shuffle_buffer
        self.limits = {"train": train_limit_blocks, "validation": val_limit_blocks, "test": test_limit_blocks}
        self.cache_dir = Path(cache_dir).expanduser()
        self.source = DocumentSource(
            data_dir=Path(data_dir).expanduser(),
            cache_dir=self.cache_dir,
            pattern=pattern,
            val_files=list(val_files),
            test_files=list(test_files),
            hub_dataset=hub_dataset,
            hub_config=hub_config,
            text_field=text_field,
        )
        self.block_size = block_size
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.seed = seed
        self.slice_seed = slice_seed
        self._load_tokenizer(tokenizer, add_bos)
        self.splits: dict[str, datasets.Dataset] = {}
        # Lightning calls prepare_data/setup for every fit, validate and test: read and tokenise once.
        self._documents: dict[str, SplitDocuments] | None = None
        self._tokenized: dict[str, datasets.Dataset] | None = None
        self._cache_keys: dict[str, str] = {}

    @staticmethod
    def check_settings(
        block_size: int,
        batch_size: int,
        eval_batch_size: int,
        train_limit_blocks: int | None,
        val_limit_blocks: int | None,
        test_limit_blocks: int | None,
        shuffle_buffer: int | None = None,
    ) -> None:
        """The constructor's range checks, which :func:`distill.config.schemas.validate` also runs on ``data``."""
        if block_size < 2:
            raise ValueError(f"block_size={block_size!r} must be at least 2 (a block predicts all but its first)")
        check_limit("train_limit_blocks", train_limit_blocks)
        check_limit("val_limit_blocks", val_limit_blocks)
        check_limit("test_limit_blocks", test_limit_blocks)
        if shuffle_buffer is not None and shuffle_buffer < 0:
            raise ValueError(
                f"shuffle_buffer={shuffle_buffer!r} must be a number of blocks >= 0 (0 or null: the stream's order)"
            )
        check_batch_sizes(batch_size, eval_batch_size)

    def _load_tokenizer(self, name: str, add_bos: bool) -> None:
        self.tokenizer_name = name
        self.tokenizer = load_tokenizer(name)
        self.tokenizer_key = tokenizer_fingerprint(self.tokenizer)
        self.vocab_size = len(self.tokenizer)
        self.separator_id = document_separator(self.tokenizer)
        pad_id = self.tokenizer.pad_token_id
        self.pad_id = self.separator_id if pad_id is None else pad_id
        self.bos_id = self.tokenizer.bos_token_id if add_bos else None
        if add_bos and self.bos_id is None:
            log.warning("data.add_bos=true, but tokenizer %r has no BOS token: documents start without one", name)

    def check_context(self, max_positions: int) -> None:
        """Refuse blocks longer than the model's context length ``max_positions``."""
        if self.block_size > max_positions:
            raise ValueError(
                f"data.block_size={self.block_size} exceeds the model's context length of {max_positions} "
                f"positions (max_position_embeddings): set data.block_size<={max_positions}"
            )

    def _load_documents(self) -> dict[str, SplitDocuments]:
        if self._documents is None:
            self._documents = self.source.load(HELD_OUT if self.streaming else SPLITS)
        return self._documents

    # Tokenising.

    def _tokenize_batch(self, batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        # verbose=False: whole documents are longer than the model's context by design.
        encoded = self.tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        prefix = [] if self.bos_id is None else [self.bos_id]
        return {"input_ids": [[*prefix, *ids, self.separator_id] for ids in encoded]}

    def _cache_key(self, split: str, documents: SplitDocuments) -> str:
        return f"text-{split}-{digest([documents.source_key, self.tokenizer_key, self.bos_id, self.separator_id])}"

    def _tokenized_splits(self) -> dict[str, datasets.Dataset]:
        if self._tokenized is None:
            out_dir = self.cache_dir / "tokenized"
            out_dir.mkdir(parents=True, exist_ok=True)
            self._tokenized = {
                split: self._tokenize(split, documents, out_dir) for split, documents in self._load_documents().items()
            }
        return self._tokenized

    def _tokenize(self, split: str, documents: SplitDocuments, out_dir: Path) -> datasets.Dataset:
        key = self._cache_keys[split] = self._cache_key(split, documents)
        with FileLock(str(out_dir / f"{key}.lock")):
            return documents.texts.map(
                self._tokenize_batch,
                batched=True,
                remove_columns=documents.texts.column_names,
                features=TOKEN_FEATURES,
                cache_file_name=str(out_dir / f"{key}.arrow"),
                new_fingerprint=key,
                desc=f"Tokenizing {split} documents",
            )

    # Blocks.

    def prepare_data(self) -> None:
        self._tokenized_splits()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        splits = {split: self._blocks(split, tokenized) for split, tokenized in self._tokenized_splits().items()}
        # Batches carry each block's row so per-block stores (cached teacher logits) can be read.
        if "train" in splits:
            splits["train"] = splits["train"].add_column(EXAMPLE_INDEX, list(range(len(splits["train"]))))
        self.splits = {split: blocks.with_format("torch") for split, blocks in splits.items()}

    def _blocks(self, split: str, tokenized: datasets.Dataset) -> datasets.Dataset:
        packed = pack_blocks(token_stream(tokenized), self.block_size, self.pad_id, keep_tail=split != "train")
        blocks = datasets.Dataset.from_dict(packed, features=BLOCK_FEATURES)
        limit = self.limits[split]
        if limit is None:
            return blocks
        if split == "train":
            blocks = blocks.shuffle(seed=self.slice_seed)
        return blocks.select(range(min(limit, len(blocks))))

    @property
    def positions_per_example(self) -> int:
        return self.block_size

    def teacher_key_fields(self) -> dict[str, Any]:
        return {"train": self.train_fingerprint(), "validation": sorted(self.documents("validation"))}

    def dataloader(
        self, split: str, batch_size: int, shuffle: bool, shard: tuple[int, int] | None = None
    ) -> DataLoader:
        if split != "train" or not self.streaming:
            return super().dataloader(split, batch_size, shuffle, shard)
        stream = self.train_stream if self.train_stream is not None else self.source.stream()
        shard = shard or data_parallel_rank(self)
        buffer = self.shuffle_buffer if shuffle else None
        blocks = PackedStream(
            stream, self._encode_streamed, self.block_size, shard, self.limits["train"], buffer, self.seed
        )
        # Read in this process, whatever data.num_workers: loader workers would each read the whole stream (or,
        # for a `datasets` stream, whole shards of it, leaving all but one idle on a one-shard source).
        return StreamLoader(blocks, batch_size, read_ahead=lightning_read_ahead(self.trainer))

    def _encode_streamed(self, text: str | None) -> list[int]:
        if text is None:
            raise ValueError(
                f"a streamed training row has no {self.source.text_field!r} column: set data.text_field=<the column>"
            )
        return self._tokenize_batch({"text": [text]})["input_ids"][0]

    def train_fingerprint(self) -> str:
        """Identity of the training blocks as batches see them: source, tokenisation, block size and slice."""
        if self.streaming:
            raise ValueError(
                "data.streaming=true has no fixed set of training blocks to key a store or a fine-tuned teacher by:"
                " set distill.teacher_cache=none (the live teacher) and teacher.finetune=false"
            )
        self.setup("fit")
        limit = self.limits["train"]
        seed = self.slice_seed if limit is not None else None
        return digest([self._cache_keys["train"], self.block_size, limit, seed, len(self.splits["train"])])

    def num_tokens(self, split: str) -> int:
        """Real (unpadded) tokens in the blocks of ``split``."""
        self.setup()
        mask = self.splits[split].select_columns(["attention_mask"]).with_format("numpy")[:]["attention_mask"]
        return int(mask.sum())

    def document_texts(self, split: str) -> list[str]:
        """The text of the documents of ``split``, in :meth:`documents` order."""
        return list(self._load_documents()[split].texts["text"])

    def documents(self, split: str) -> list[str]:
        """Names of the documents of ``split`` (file names relative to ``data_dir``)."""
        return list(self._load_documents()[split].names)

    def prompts(self, split: str, count: int, length: int) -> list[str]:
        """The text of the first ``length`` tokens of ``count`` evenly spaced blocks of held-out ``split``."""
        if split not in HELD_OUT:
            raise ValueError(f"split={split!r} must be one of {HELD_OUT}: prompts come from held-out text")
        self.setup()
        blocks = self.splits[split].with_format("numpy")
        if not 1 <= count <= len(blocks):
            raise ValueError(f"count={count!r} must be in [1, {len(blocks)}] (the {split} blocks)")
        if not 1 <= length <= self.block_size:
            raise ValueError(f"length={length!r} must be in [1, {self.block_size}] (data.block_size)")
        picked = blocks.select([row * len(blocks) // count for row in range(count)])[:]
        starts = zip(picked["input_ids"][:, :length], picked["attention_mask"][:, :length], strict=True)
        return [self.tokenizer.decode(ids[real == 1], skip_special_tokens=True) for ids, real in starts]

    def reference_prompts(
        self, split: str, count: int, prompt_tokens: int, new_tokens: int
    ) -> list[tuple[list[int], list[int]]]:
        """(prompt, true continuation) token ids: the first ``prompt_tokens`` real tokens of ``count`` evenly
        spaced held-out blocks and the next ``new_tokens`` (fewer where the block ends first)."""
        prompt_tokens = min(prompt_tokens, self.block_size - 1)
        self.setup()
        blocks = self.splits[split].with_format("numpy")
        count = min(count, len(blocks))
        picked = blocks.select([row * len(blocks) // count for row in range(count)])[:]
        pairs = []
        for ids, real in zip(picked["input_ids"], picked["attention_mask"], strict=True):
            tokens = ids[real == 1].tolist()
            pairs.append((tokens[:prompt_tokens], tokens[prompt_tokens : prompt_tokens + new_tokens]))
        return pairs

    def extra_test_loaders(self) -> dict[str, DataLoader]:
        """Held-out loaders beyond the test split: none (the test split is the corpus)."""
        return {}
