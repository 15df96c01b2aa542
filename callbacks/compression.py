"""The contract of a callback that compresses the student during ``fit`` (pruning masks, N:M, QAT).

The compression-aware checkpoint asks each one whether its schedule is done (:meth:`complete`), so that
only validations of the final compressed student rank checkpoints; the export asks what it did
(:meth:`describe`) for ``student/compression.json``. Other callbacks are neither asked nor probed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import lightning.pytorch as pl


class CompressionCallback(pl.Callback, ABC):
    def complete(self, global_step: int) -> bool:
        """Whether the student has reached its final compressed state at ``global_step``; a callback without
        a schedule (masks held from the first step) always has."""
        return True

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What this callback did to the student, for the export's manifest (JSON-serialisable)."""
