"""Training loaders that a checkpoint resumes mid-epoch at the very batch, with the very random numbers.

Lightning saves the ``state_dict()`` of every training loader that has one into the checkpoint (its fit loop's
``combined_loader``) and hands it back to ``load_state_dict()`` before the resumed epoch's iterator starts;
a loader without one restarts the epoch and Lightning warns that it is "not resumable". A
:class:`ResumableLoader`'s state is:

* its place: the epoch its sampler was set to and the batches it yielded in it. A resumed epoch skips that
  many batches of the sampler's (seeded, per-epoch) order without reading or collating them;
* per data-parallel rank, the collator's random stream (the perturbed copies of
  :class:`~distill.data.augment.AugmentingCollator`) and the process's global generators
  (:mod:`distill.utils.random_state`: dropout, on-policy sampling). The global ones are set back just before
  the first resumed batch is read, so whatever the resumed process drew before (seeding, sanity validation,
  the teacher stages) does not count: the training steps draw what the interrupted run would have.

Exact with ``num_workers=0`` only: workers keep random streams of their own (their perturbed copies) and read
indices ahead, before Lightning sets a resumed epoch on the sampler; no checkpoint holds either.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from distill.utils import random_state


class FastForward(Sampler[list[int]]):
    """A batch sampler that, once, starts the epoch it was saved in ``batches`` batches in: those batches'
    indices are drawn and dropped, no rows read. ``epoch`` says which epoch the loader's sampler is set to."""

    def __init__(self, batches: Sampler[list[int]], epoch: Callable[[], int]) -> None:
        self.batches, self.epoch = batches, epoch
        self.resume: tuple[int, int] | None = None  # (epoch, batches) of a loaded state, until the next epoch
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        # Lazily, at the first batch: Lightning sets the sampler's epoch after it asks for the iterator.
        saved, self.resume = self.resume, None
        self.skipped = saved[1] if saved is not None and saved[0] == self.epoch() else 0
        yield from itertools.islice(self.batches, self.skipped, None)


class ResumableLoader(DataLoader):
    """A training ``DataLoader`` whose ``state_dict`` Lightning checkpoints (see the module docstring).

    Its sampler must draw one fixed order per epoch from its seed and ``set_epoch`` (a ``DistributedSampler``,
    :class:`~distill.data.sampler.LengthGroupedBatchSampler`), never from the global generator: the resumed
    epoch must be the interrupted one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fast_forward = FastForward(self.batch_sampler, self.epoch)
        self._yielded = 0
        self._streams: dict[str, Any] | None = None
        self._epoch_used_up = False

    @property
    def _index_sampler(self) -> FastForward:
        # DataLoader reads its batches of indices here; `sampler` and `batch_sampler` stay the ones built,
        # where Lightning (and the teacher-logit replay) set the epoch.
        return self._fast_forward

    def __iter__(self) -> Iterator[Any]:
        # The iterator is made now, as a plain DataLoader's is: it draws its worker seed from torch's generator.
        self._yielded = self._fast_forward.skipped = 0
        return self._counted(super().__iter__())

    def _counted(self, batches: Iterator[Any]) -> Iterator[Any]:
        if self._streams is not None:
            batches = self._set_streams_back(batches)
        for batch in batches:
            self._yielded += 1
            yield batch

    def _set_streams_back(self, batches: Iterator[Any]) -> Iterator[Any]:
        """At the first resumed batch, the generators as the interrupted run left them. Where that run had used
        up its epoch, it made the next epoch's iterator after saving, drawing from them: so does this one."""
        random_state.restore(self._streams)
        self._streams = None
        return super().__iter__() if self._epoch_used_up else batches

    def epoch(self) -> int:
        """The epoch Lightning last set, on ``sampler`` or ``batch_sampler.sampler`` as it does."""
        for sampler in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            if hasattr(sampler, "epoch"):
                return sampler.epoch
        return 0

    def position(self) -> tuple[int, int]:
        """(epoch, batches yielded in it); a loaded state counts until the epoch it resumes starts."""
        if self._fast_forward.resume is not None:
            return self._fast_forward.resume
        return self.epoch(), self._fast_forward.skipped + self._yielded

    def state_dict(self) -> dict[str, Any]:
        """Where the epoch stands and every rank's random streams (collective: every rank saves)."""
        stateful = hasattr(self.collate_fn, "state_dict")
        collate = self.collate_fn.state_dict() if stateful else None
        # Streams loaded but not yet set back (no batch since) are still the ones to save.
        streams = self._streams if self._streams is not None else random_state.capture()
        ranks = random_state.gathered({"random": streams, "collate": collate})
        epoch, batches = self.position()
        return {"epoch": epoch, "batches": batches, "length": len(self), "ranks": ranks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``: the next iteration skips its batches if it is the epoch it was saved in."""
        mine = random_state.this_ranks(state["ranks"], "the checkpoint's training-loader state")
        if state["length"] != len(self):
            raise ValueError(
                f"the checkpoint's training loader had {state['length']} batches per epoch and this run's has"
                f" {len(self)}: resume with the data, batch size and number of ranks it was saved with"
            )
        if mine["collate"] is not None:
            self.collate_fn.load_state_dict(mine["collate"])
        self._streams = mine["random"]
        self._epoch_used_up = state["batches"] >= state["length"]
        self._fast_forward.resume = (state["epoch"], state["batches"])


def replay_generator(shard: tuple[int, int] | None, seed: int) -> torch.Generator | None:
    """The generator of a loader built with an explicit ``shard``, read outside fit (pruning calibration,
    teacher-logit replays): its iterator's seed draw must not come from the global generator, or a run whose
    caches were cold (and read it) would draw other dropout and samples than one whose caches were warm."""
    return None if shard is None else torch.Generator().manual_seed(seed)
