"""A training corpus streamed rather than materialized: documents read, tokenised and packed into blocks as the
loader asks for them, for corpora larger than memory or disk.

The stream is any iterable of ``{"text": ...}`` rows (a ``datasets.IterableDataset``: ``load_dataset(...,
streaming=True)`` or ``IterableDataset.from_generator``). Blocks are the same non-overlapping ``block_size``
windows of the documents' token stream that :func:`~distill.data.text.pack_blocks` cuts (the tail dropped),
numbered by their place in the stream (the batches' :data:`~distill.utils.keys.EXAMPLE_INDEX`).

Order: the stream's, or with ``shuffle_buffer`` blocks that of a shuffle buffer, as
``datasets.IterableDataset.shuffle(buffer_size=...)``: the buffer fills from the stream, then each block read
takes the place of one drawn at random, which is yielded (a block comes out at most ``shuffle_buffer - 1``
places early, any number late). Its generator is seeded with the data seed and the epoch, never the rank: an
epoch's order is a function of (seed, epoch, stream), each epoch draws another, and every rank draws the same
and takes every ``replicas``-th block of it from its own rank on (round-robin), so ranks see disjoint blocks.
A resumed epoch refills the buffer from the same seed: it replays the interrupted epoch's order.

Resume: a checkpoint holds the epoch, the batches trained in it and, per data-parallel rank, the global
generators (:mod:`distill.utils.random_state`: dropout, on-policy samples). A resumed loader re-reads its epoch
and drops the batches trained, re-tokenising them, not training on them; it sets the generators back just before
the first resumed batch is trained. So a run stopped at any step and resumed ends bitwise where the uninterrupted
run does (CPU), provided the stream gives the same rows in the same order each time it is read. Lightning's fit
loop reads an unsized loader one batch ahead of training (to know an epoch's last batch before training it; not
where ``trainer.limit_train_batches`` sets the epoch's length): a batch counts as trained once the next one is
asked for or the stream has ended, and an epoch whose stream ended resumes at the next epoch's start. That batch
is read when the fit sets up, so the state must come before: a strategy that restores checkpoints after setup
(``trainer=fsdp``) is refused. The stream is read in the training process (no loader workers); the loader draws
nothing from the global generators.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from distill.utils import random_state
from distill.utils.keys import EXAMPLE_INDEX

T = TypeVar("T")


def shuffled(items: Iterable[T], size: int, generator: np.random.Generator) -> Iterator[T]:
    """``items`` through a shuffle buffer of ``size``: once it is full, each item read takes the place of one
    drawn at random, which is yielded; what is left in the buffer at the end comes out in random order."""
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        drawn = int(generator.integers(size))
        yield buffer[drawn]
        buffer[drawn] = item
    generator.shuffle(buffer)
    yield from buffer


class PackedStream(IterableDataset):
    """Blocks of ``block_size`` tokens packed on the fly from ``documents``; ``encode`` tokenises one document
    (its separator included). Of the first ``limit`` blocks, in the order of epoch ``epoch`` (``shuffle_buffer``
    blocks, drawn with ``seed``; 0 or None: the stream's), yields this rank's, ``skip`` of them dropped."""

    def __init__(
        self,
        documents: Iterable[dict[str, Any]],
        encode: Callable[[str], list[int]],
        block_size: int,
        shard: tuple[int, int],
        limit: int | None = None,
        shuffle_buffer: int | None = None,
        seed: int = 0,
    ) -> None:
        self.documents, self.encode, self.block_size = documents, encode, block_size
        self.rank, self.replicas = shard
        self.limit, self.shuffle_buffer, self.seed = limit, shuffle_buffer, seed
        # Where the next iterator starts (StreamLoader sets them).
        self.epoch = self.skip = 0

    def blocks(self) -> Iterator[np.ndarray]:
        """Every rank's blocks, in stream order."""
        buffer: list[int] = []
        for row in self.documents:
            buffer.extend(self.encode(row["text"]))
            full = len(buffer) // self.block_size * self.block_size
            yield from np.asarray(buffer[:full], dtype=np.int64).reshape(-1, self.block_size)
            del buffer[:full]

    def order(self, epoch: int) -> Iterator[tuple[int, np.ndarray]]:
        """Every rank's blocks with their place in the stream, in epoch ``epoch``'s order."""
        numbered = enumerate(itertools.islice(self.blocks(), self.limit))
        if not self.shuffle_buffer:
            return numbered
        # One generator per (seed, epoch); SeedSequence takes no negative seed, hence the modulo.
        generator = np.random.default_rng([self.seed % 2**64, epoch])
        return shuffled(numbered, self.shuffle_buffer, generator)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self._rows(self.epoch, self.skip)

    def _rows(self, epoch: int, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        mine = itertools.islice(self.order(epoch), self.rank, None, self.replicas)
        for index, block in itertools.islice(mine, skip, None):
            ids = torch.from_numpy(block)
            yield {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "labels": ids.clone(),
                EXAMPLE_INDEX: index,
            }


class EpochSampler(Sampler[None]):
    """The sampler of an iterable dataset's loader (``None`` forever, as torch's own) that keeps the epoch
    Lightning sets at each epoch's start."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[None]:
        return itertools.repeat(None)


def lightning_read_ahead(trainer: Any) -> int:
    """The batches Lightning's fit loop reads from an unsized training loader beyond the one it trains: one (it
    must know an epoch's last batch before training it), none where ``limit_train_batches`` sets the epoch's
    length (or outside a trainer)."""
    return 0 if trainer is None or isinstance(trainer.limit_train_batches, int) else 1


class StreamLoader(DataLoader):
    """A training loader over a :class:`PackedStream` that a checkpoint resumes exactly (see the module
    docstring). ``read_ahead``: the batches its consumer reads beyond the one it trains
    (:func:`lightning_read_ahead`)."""

    dataset: PackedStream

    def __init__(self, dataset: PackedStream, batch_size: int, read_ahead: int = 0) -> None:
        # Its iterators draw their seed (for workers it never has) from a generator of their own: the global
        # ones hold the training's draws only, and a resumed epoch starts wherever they stand.
        super().__init__(dataset, batch_size=batch_size, generator=torch.Generator())
        # Lightning calls set_epoch on `batch_sampler.sampler`; torch's default there has no epoch to set.
        self.epochs = EpochSampler()
        self.batch_sampler.sampler = self.epochs
        self.read_ahead = read_ahead
        self._resume: tuple[int, int] | None = None  # (epoch, batches) of a loaded state, until the next epoch
        self._streams: dict[str, Any] | None = None  # a loaded state's generators, until they are set back
        self._epoch = self._trained_before = self._read = 0
        self._ended = False

    def __iter__(self) -> Iterator[Any]:
        return self._counted()

    def _counted(self) -> Iterator[Any]:
        # Lazily, at the first batch: Lightning sets the epoch after it asks for the iterator. A resumed run
        # reading ahead asks for that batch before: the loaded state set the epoch it resumes.
        resume, self._resume = self._resume, None
        self._epoch, self._read, self._ended = self.epochs.epoch, 0, False
        self._trained_before = resume[1] if resume is not None and resume[0] == self._epoch else 0
        self.dataset.epoch, self.dataset.skip = self._epoch, self._trained_before * self.batch_size
        batches = super().__iter__()
        while True:
            if self._streams is not None and self._read == self.read_ahead:
                # Asked for the batch after those read ahead: the first resumed batch is about to be trained.
                random_state.restore(self._streams)
                self._streams = None
            batch = next(batches, None)
            if batch is None:
                self._ended = True
                return
            self._read += 1
            yield batch

    def position(self) -> tuple[int, int]:
        """(epoch, batches trained in it); an epoch whose stream ended counts as the next one's start."""
        if self._resume is not None:
            return self._resume
        if self._ended:
            return self._epoch + 1, 0
        return self._epoch, self._trained_before + max(self._read - self.read_ahead, 0)

    def state_dict(self) -> dict[str, Any]:
        """The place to resume at and every rank's generators (collective: every rank saves)."""
        # Generators loaded but not yet set back (no batch trained since) are still the ones to save.
        streams = self._streams if self._streams is not None else random_state.capture()
        epoch, batches = self.position()
        return {"epoch": epoch, "batches": batches, "ranks": random_state.gathered(streams)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``: the epoch it names re-reads its stream and drops the batches trained."""
        if 0 < self._read <= self.read_ahead and not self._ended:
            raise ValueError(
                "the streamed training loader's checkpoint state came after it had read the batch Lightning trains"
                " first (a strategy that restores checkpoints after setup: trainer=fsdp): resume a streamed run"
                " under trainer=ddp, or with trainer.limit_train_batches=<batches per epoch>"
            )
        self._streams = random_state.this_ranks(state["ranks"], "the checkpoint's streamed-loader state")
        self._resume = (state["epoch"], state["batches"])
        self.epochs.epoch = state["epoch"]
