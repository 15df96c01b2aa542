"""Log the student's compression (``compression/*``) at every validation; see distill.pruning.compression_report."""

from __future__ import annotations

import lightning.pytorch as pl

from distill.modules.distillation import DistillationModule
from distill.pruning.compression_report import compression_report


class CompressionReport(pl.Callback):
    """Totals of :func:`distill.pruning.compression_report.compression_report`, logged as ``compression/<key>``."""

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: DistillationModule) -> None:
        if trainer.sanity_checking:
            return
        teacher = pl_module.teacher.model if pl_module.teacher is not None else None
        _, totals = compression_report(pl_module.student, teacher)
        # Every rank computes the same numbers from identical (masked) weights, so the mean over
        # ranks that sync_dist takes (once per validation) changes nothing.
        pl_module.log_dict({f"compression/{key}": float(value) for key, value in totals.items()}, sync_dist=True)
