"""The "best" checkpoint of a compressed student: the best validation where its compression is complete.

Compression callbacks change the student during fit (masks tightening up to ``end_step``, 2:4 masks
from ``prune_step``, fake quantization from ``start_step``). A validation before that point scores
a denser or unquantized student than the one exported, so it must not become the checkpoint that is
tested. Each compression callback answers ``complete(global_step)``; this ``ModelCheckpoint`` ranks
(top-k) only the validations where every one of them answers yes. ``save_last`` is unaffected, so a
run resumes from any point. Without compression callbacks it is a plain ``ModelCheckpoint``.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor

from distill.callbacks.compression import CompressionCallback


def compression_complete(trainer: pl.Trainer) -> bool:
    """Whether every callback with a compression schedule has reached its final state."""
    compressing = [callback for callback in trainer.callbacks if isinstance(callback, CompressionCallback)]
    return all(callback.complete(trainer.global_step) for callback in compressing)


class CompressionAwareCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose best checkpoints come only from validations of the final compressed student."""

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        # ModelCheckpoint routes every top-k save through this method (Lightning 1.x and 2.x);
        # tests/test_checkpoint.py fails if a Lightning release stops doing so.
        if compression_complete(trainer):
            super()._save_topk_checkpoint(trainer, monitor_candidates)
