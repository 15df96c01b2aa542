"""The distill arm's facts, from inside ``python -m distill.train``: a callback the bench adds by override,

    +callbacks.bench_facts._target_=bench.peers.fit_timer.FitTimer +callbacks.bench_facts.path=<facts.json>

that writes what the other arms' loops write themselves (:class:`bench.peers.common.FitFacts`): fit's start and
end, the blocks trained on in order, the targets and the process's peak memory at the end of fit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from bench.peers.common import FitFacts


class FitTimer(pl.Callback):
    def __init__(self, path: str) -> None:
        self.facts = FitFacts(Path(path))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.facts.start()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, _: int) -> None:
        self.facts.batch(batch)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.facts.end()
