"""The teacher's answers on the unlabelled perturbed copies a training batch carries (:mod:`distill.data.augment`)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from distill.losses.topk import TopKTargets
from distill.modules.frozen_teacher import FrozenTeacher


class CopyTargets:
    """The store's answers when it holds these very copies (same epoch, same fingerprint), else the live teacher's.

    ``store`` is a :class:`~distill.stores.teacher_logits.TeacherLogitStore`'s ``copies`` (or ``None``: always live).
    ``labelled_live`` counts the steps the live teacher labelled; the first one warns, once per run, since
    each means a teacher forward the store was meant to save.
    """

    def __init__(self, store: Any = None) -> None:
        self.store = store
        self.labelled_live = 0

    def __call__(
        self,
        teacher: FrozenTeacher,
        copies: dict[str, Tensor],
        epoch: int,
        step: int,
        example_index: Tensor | None,
        fingerprint: Tensor | None,
    ) -> Tensor | TopKTargets:
        if self.store is not None and example_index is not None and fingerprint is not None:
            stored = self.store.lookup(epoch, example_index, fingerprint)
            if stored is not None:
                return stored
            self._count_live(step)
        return teacher(copies).logits

    def _count_live(self, step: int) -> None:
        if self.labelled_live == 0:
            rank_zero_warn(
                f"the perturbed copies of step {step} are not in the teacher-logit store (DataLoader workers,"
                " another number of ranks or more epochs than stored): the live teacher"
                " labels copies the store lacks"
            )
        self.labelled_live += 1
