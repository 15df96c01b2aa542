"""A training corpus streamed rather than materialized: documents read, tokenised and packed into blocks as the
loader asks for them, for corpora larger than memory or disk.

The stream is any iterable of ``{"text": ...}`` rows (a ``datasets.IterableDataset``: ``load_dataset(...,
streaming=True)`` or ``IterableDataset.from_generator``). Blocks are the same non-overlapping ``block_size``
windows of the documents' token stream that :func:`~distill.data.text.pack_blocks` cuts (the tail dropped),
in the stream's order (no shuffling: shuffle the source), dealt round-robin to the data-parallel ranks. A
checkpoint holds the batches yielded; a resumed loader reads and drops that many again (re-tokenising them,
not training on them). The stream is read in the training process (no loader workers); the global random
streams (dropout) are not set back on resume.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from distill.utils.keys import EXAMPLE_INDEX


class PackedStream(IterableDataset):
    """Blocks of ``block_size`` tokens packed on the fly from ``documents``; ``encode`` tokenises one document
    (its separator included). Yields this rank's blocks, ``skip`` of them dropped, at most ``limit`` in all."""

    def __init__(
        self,
        documents: Iterable[dict[str, Any]],
        encode: Callable[[str], list[int]],
        block_size: int,
        shard: tuple[int, int],
        limit: int | None = None,
    ) -> None:
        self.documents, self.encode, self.block_size = documents, encode, block_size
        self.rank, self.replicas = shard
        self.limit, self.skip = limit, 0

    def blocks(self) -> Iterator[np.ndarray]:
        """Every rank's blocks, in stream order."""
        buffer: list[int] = []
        for row in self.documents:
            buffer.extend(self.encode(row["text"]))
            full = len(buffer) // self.block_size * self.block_size
            yield from np.asarray(buffer[:full], dtype=np.int64).reshape(-1, self.block_size)
            del buffer[:full]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # Only the first epoch after a resume starts late.
        skip, self.skip = self.skip, 0
        return self._rows(skip)

    def _rows(self, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        mine = itertools.islice(enumerate(itertools.islice(self.blocks(), self.limit)), self.rank, None, self.replicas)
        for index, block in itertools.islice(mine, skip, None):
            ids = torch.from_numpy(block)
            yield {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "labels": ids.clone(),
                EXAMPLE_INDEX: index,
            }


class StreamLoader(DataLoader):
    """A training loader over a :class:`PackedStream` whose checkpoint state is the batches it yielded."""

    dataset: PackedStream

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._yielded = 0

    def __iter__(self) -> Iterator[Any]:
        self._yielded = self.dataset.skip // self.batch_size
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self._yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.skip = state["batches"] * self.batch_size
