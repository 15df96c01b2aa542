"""Knowledge-distillation loss (Hinton et al., 2015) with an explicit, tested contract.

Contract of :func:`kd_loss`::

    loss = alpha * CE(labels, student) + (1 - alpha) * T**2 * KL(softmax(teacher / T) || softmax(student / T))

* Both terms are computed in fp32, whatever the input dtype.
* KL is summed over the class dimension (the last one) and averaged over the examples
  that count; CE is averaged over the same examples.
* An example counts unless its label equals ``ignore_index``. With ``labels=None`` every
  example counts, and ``alpha`` must be 0 (there is nothing to compute CE against).
* The KD term is multiplied by ``T**2`` so that its gradient with respect to the student
  logits keeps the same scale as ``T`` changes (the soft-target gradient shrinks as 1/T**2).
* ``alpha=1`` is plain fine-tuning on hard labels; teacher logits may then be ``None``.
* If no example counts, the loss is a zero that still has a graph to the student logits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.topk import TopKTargets, topk_kl


class KDLossTerms(NamedTuple):
    """The total loss and its two parts, each already weighted by ``alpha`` / ``1 - alpha``.

    ``ce`` and ``kd`` are the unweighted terms: ``ce`` is the mean cross-entropy and ``kd``
    is ``T**2 * KL``, so ``loss == alpha * ce + (1 - alpha) * kd``.
    """

    loss: Tensor
    ce: Tensor
    kd: Tensor


def check_kd_args(temperature: float, alpha: float) -> None:
    """Raise ``ValueError`` naming the value if ``temperature`` or ``alpha`` is out of range."""
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha!r} must be in [0, 1]")


def _soft_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Per-example KL(softmax(t/T) || softmax(s/T)), summed over the last dimension."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    p_teacher = log_p_teacher.exp()
    # Classes the teacher rules out (p = 0, e.g. masked logits) contribute exactly 0, not 0 * inf.
    pointwise = torch.where(p_teacher > 0, p_teacher * (log_p_teacher - log_p_student), 0.0)
    return pointwise.sum(dim=-1)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    count = mask.sum()
    return (values * mask).sum() / count.clamp(min=1)


def kd_loss_terms(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor | None = None,
    *,
    temperature: float,
    alpha: float,
    ignore_index: int = -100,
) -> KDLossTerms:
    """Compute the loss of the module contract and its unweighted CE and KD parts.

    Args:
        student_logits: ``(..., C)`` logits of the trainable student.
        teacher_logits: ``(..., C)`` logits of the frozen teacher, or its cached top-K targets
            (:class:`distill.topk.TopKTargets`); ``None`` only if ``alpha == 1``.
        labels: ``(...)`` integer class labels, ``ignore_index`` where an example must not count.
        temperature: softmax temperature ``T > 0`` of the KD term.
        alpha: weight of the hard-label CE term, in ``[0, 1]``.
        ignore_index: label value that excludes an example from both terms.
    """
    check_kd_args(temperature, alpha)
    if labels is None and alpha > 0:
        raise ValueError(f"labels=None requires alpha=0 (got alpha={alpha!r}): CE needs labels")
    if teacher_logits is None and alpha < 1:
        raise ValueError(f"teacher_logits=None requires alpha=1 (got alpha={alpha!r})")
    student = student_logits.float()
    batch_shape = student.shape[:-1]
    if labels is None:
        mask = torch.ones(batch_shape, dtype=torch.float32, device=student.device)
    else:
        mask = (labels != ignore_index).float()
    zero = student.sum() * 0.0
    ce = zero
    if alpha > 0:
        safe_labels = torch.where(labels == ignore_index, 0, labels)
        per_example = F.cross_entropy(student.reshape(-1, student.shape[-1]), safe_labels.reshape(-1), reduction="none")
        ce = _masked_mean(per_example.reshape(batch_shape), mask)
    kd = zero
    if alpha < 1:
        if isinstance(teacher_logits, TopKTargets):
            kl = topk_kl(student, teacher_logits, temperature)
        else:
            kl = _soft_kl(student, teacher_logits.float(), temperature)
        kd = temperature**2 * _masked_mean(kl, mask)
    return KDLossTerms(loss=alpha * ce + (1 - alpha) * kd, ce=ce, kd=kd)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor | None = None,
    *,
    temperature: float,
    alpha: float,
    ignore_index: int = -100,
) -> Tensor:
    """``alpha * CE(labels, s) + (1 - alpha) * T**2 * KL(softmax(t/T) || softmax(s/T))`` in fp32.

    See the module docstring for the full contract (reduction, masking, T**2).

    ``teacher_logits`` may also be cached top-K targets (:class:`distill.topk.TopKTargets`), for
    vocabularies too large to store; :mod:`distill.topk` states that contract.

    >>> s, t = torch.tensor([[2.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    >>> float(kd_loss(s, t, temperature=2.0, alpha=0.0))
    0.0
    """
    return kd_loss_terms(
        student_logits, teacher_logits, labels, temperature=temperature, alpha=alpha, ignore_index=ignore_index
    ).loss


class KDLoss(nn.Module):
    """:func:`kd_loss_terms` with ``temperature`` and ``alpha`` fixed at construction."""

    def __init__(self, temperature: float, alpha: float, ignore_index: int = -100) -> None:
        super().__init__()
        check_kd_args(temperature, alpha)
        self.temperature = temperature
        self.alpha = alpha
        self.ignore_index = ignore_index

    def forward(self, student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor | None) -> KDLossTerms:
        return kd_loss_terms(
            student_logits,
            teacher_logits,
            labels,
            temperature=self.temperature,
            alpha=self.alpha,
            ignore_index=self.ignore_index,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, ignore_index={self.ignore_index}"
