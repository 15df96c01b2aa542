"""Knowledge-distillation loss (Hinton et al., 2015) with an explicit, tested contract.

Contract of :func:`kd_loss`::

    loss = alpha * CE(labels, student) + (1 - alpha) * T**2 * D(softmax(teacher / T), softmax(student / T))

* ``D`` is the per-example ``divergence`` between teacher ``q`` and student ``p``, a member of
  :data:`distill.losses.divergences.DIVERGENCES` (formulas there): ``forward_kl`` ``KL(q || p)`` (the default, the
  Hinton KD term), ``reverse_kl`` ``KL(p || q)``, ``jsd`` (generalised Jensen-Shannon divided by
  ``beta (1 - beta)``: forward KL at ``beta = 0``, reverse KL at ``beta = 1``, ``4 * JSD`` at 0.5),
  ``skew_kl`` ``KL(q || beta q + (1 - beta) p)``, ``skew_rkl`` ``KL(p || beta p + (1 - beta) q)`` and ``tvd``
  ``0.5 * sum |p - q|``. ``beta`` (default 0.5) is the weight of ``jsd`` and the skew members, in ``[0, 1]``
  (``[0, 1)`` for the skew members); the others ignore it. Bad names or weights raise ``ValueError``.
* Both terms are computed in fp32, whatever the input dtype (``log_softmax`` of the upcast logits).
* ``D`` is summed over the class dimension (the last one) and averaged over the examples
  that count; CE is averaged over the same examples. With ``normalizer=n`` both are instead
  ``sum over counted examples / n``: pass the number of counted examples of the whole optimizer step,
  all ranks and accumulated micro-batches together, so that the step's loss is the mean over its tokens
  rather than a mean of per-batch means (which over-weights short batches).
* An example counts unless its label equals ``ignore_index``. With ``labels=None`` every
  example counts, and ``alpha`` must be 0 (there is nothing to compute CE against).
* The soft term is multiplied by ``T**2`` for every member: for the KL family the soft-target gradient
  with respect to the student logits shrinks as ``1/T**2``, and the factor keeps its scale as ``T`` changes.
  The same factor is applied to ``jsd``, ``skew_*`` and ``tvd`` so that changing ``divergence`` never
  changes how ``alpha`` and ``T`` weigh the terms; their own gradients need not scale exactly as ``1/T**2``.
* ``alpha=1`` is plain fine-tuning on hard labels; teacher logits may then be ``None``.
* If no example counts, the loss is a zero that still has a graph to the student logits.
* Cached top-K teacher targets (:class:`distill.losses.topk.TopKTargets`) are compared as the (K + 1)-way (or
  renormalised K-way) distributions of :func:`distill.losses.topk.topk_log_probs`, with the same divergence.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses import divergences
from distill.losses.topk import TopKTargets, topk_log_probs


class KDLossTerms(NamedTuple):
    """The total loss and its two parts, unweighted.

    ``ce`` is the mean cross-entropy and ``kd`` is ``T**2 * D`` (``D`` the chosen divergence), neither
    multiplied by its weight, so ``loss == alpha * ce + (1 - alpha) * kd``. A term whose weight is 0 is
    not computed: it is a zero that keeps the student's graph. The fused head kernels
    (``CausalLMTask.fused_terms``) return the total only, with ``ce`` and ``kd`` ``None``.
    """

    loss: Tensor
    ce: Tensor | None
    kd: Tensor | None


def check_kd_args(temperature: float, alpha: float, divergence: str = "forward_kl", beta: float = 0.5) -> None:
    """Raise ``ValueError`` naming the value if any argument is out of range (see the module docstring)."""
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha!r} is outside [0.0, 1.0]")
    divergences.check_divergence_args(divergence, beta)


def _check_normalizer(normalizer: Tensor | float | None) -> None:
    # A tensor is not inspected: reading its value would force a device sync on every step.
    if normalizer is not None and not isinstance(normalizer, Tensor) and not normalizer >= 0:
        raise ValueError(f"normalizer={normalizer!r} must be a count >= 0")


def _reduce(values: Tensor, mask: Tensor, normalizer: Tensor | float | None) -> Tensor:
    """Sum over counted rows divided by their count, or by ``normalizer``; a count below 1 counts as 1."""
    total = (values * mask).sum()
    count = mask.sum() if normalizer is None else torch.as_tensor(normalizer, dtype=total.dtype, device=total.device)
    return total / count.clamp(min=1)


def _hard_ce(student: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """Per-example fp32 cross-entropy; ignored examples get the (finite) loss of class 0, masked later."""
    safe_labels = torch.where(labels == ignore_index, 0, labels)
    flat = F.cross_entropy(student.reshape(-1, student.shape[-1]), safe_labels.reshape(-1), reduction="none")
    return flat.reshape(student.shape[:-1])


def _soft_term(
    student: Tensor, teacher: Tensor | TopKTargets, temperature: float, divergence: str, beta: float
) -> Tensor:
    """Per-example divergence between the teacher's and the student's distributions at temperature ``T``."""
    if isinstance(teacher, TopKTargets):
        log_p, log_q = topk_log_probs(student, teacher, temperature)
    else:
        log_p = F.log_softmax(student / temperature, dim=-1)
        log_q = F.log_softmax(teacher.float() / temperature, dim=-1)
    return divergences.divergence(log_p, log_q, divergence, beta)


def kd_loss_terms(
    student_logits: Tensor,
    teacher_logits: Tensor | TopKTargets | None,
    labels: Tensor | None = None,
    *,
    temperature: float,
    alpha: float,
    ignore_index: int = -100,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    normalizer: Tensor | float | None = None,
) -> KDLossTerms:
    """Compute the loss of the module contract and its unweighted CE and KD parts.

    Args:
        student_logits: ``(..., C)`` logits of the trainable student.
        teacher_logits: ``(..., C)`` logits of the frozen teacher, or its cached top-K targets
            (:class:`distill.losses.topk.TopKTargets`); ``None`` only if ``alpha == 1``.
        labels: ``(...)`` integer class labels, ``ignore_index`` where an example must not count.
        temperature: softmax temperature ``T > 0`` of the KD term.
        alpha: weight of the hard-label CE term, in ``[0, 1]``.
        ignore_index: label value that excludes an example from both terms.
        divergence: member of :data:`distill.losses.divergences.DIVERGENCES` used for the soft term.
        beta: weight of ``jsd`` / ``skew_kl`` / ``skew_rkl``, in ``[0, 1]`` (``[0, 1)`` for the skew members).
        normalizer: if given, both terms are ``sum over counted examples / normalizer`` instead of the local
            mean: the counted examples (tokens) of the whole optimizer step, across ranks and accumulation
            steps. A number must be ``>= 0``; a value below 1 counts as 1, as the local count does.
    """
    check_kd_args(temperature, alpha, divergence, beta)
    _check_normalizer(normalizer)
    if labels is None and alpha > 0:
        raise ValueError(f"labels=None requires alpha=0 (got alpha={alpha!r}): CE needs labels")
    if teacher_logits is None and alpha < 1:
        raise ValueError(f"teacher_logits=None requires alpha=1 (got alpha={alpha!r})")
    student = student_logits.float()
    if labels is None:
        mask = torch.ones(student.shape[:-1], dtype=torch.float32, device=student.device)
    else:
        mask = (labels != ignore_index).float()
    ce = kd = student.sum() * 0.0
    if alpha > 0:
        ce = _reduce(_hard_ce(student, labels, ignore_index), mask, normalizer)
    if alpha < 1:
        soft = _soft_term(student, teacher_logits, temperature, divergence, beta)
        kd = temperature**2 * _reduce(soft, mask, normalizer)
    return KDLossTerms(loss=alpha * ce + (1 - alpha) * kd, ce=ce, kd=kd)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | TopKTargets | None,
    labels: Tensor | None = None,
    *,
    temperature: float,
    alpha: float,
    ignore_index: int = -100,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    normalizer: Tensor | float | None = None,
) -> Tensor:
    """``alpha * CE(labels, s) + (1 - alpha) * T**2 * D(softmax(t/T), softmax(s/T))`` in fp32.

    ``D`` is ``divergence`` (default forward KL, ``KL(softmax(t/T) || softmax(s/T))``); see the module
    docstring for the full contract (members, ``beta``, reduction, ``normalizer``, masking, T**2).

    ``teacher_logits`` may also be cached top-K targets (:class:`distill.losses.topk.TopKTargets`), for
    vocabularies too large to store; :mod:`distill.losses.topk` states that contract.

    >>> s, t = torch.tensor([[2.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    >>> float(kd_loss(s, t, temperature=2.0, alpha=0.0))
    0.0
    """
    return kd_loss_terms(
        student_logits,
        teacher_logits,
        labels,
        temperature=temperature,
        alpha=alpha,
        ignore_index=ignore_index,
        divergence=divergence,
        beta=beta,
        normalizer=normalizer,
    ).loss


class KDLoss(nn.Module):
    """:func:`kd_loss_terms` with ``temperature``, ``alpha``, ``divergence`` and ``beta`` fixed at construction."""

    def __init__(
        self,
        temperature: float,
        alpha: float,
        ignore_index: int = -100,
        *,
        divergence: str = "forward_kl",
        beta: float = 0.5,
    ) -> None:
        super().__init__()
        check_kd_args(temperature, alpha, divergence, beta)
        self.temperature = temperature
        self.alpha = alpha
        self.ignore_index = ignore_index
        self.divergence = divergence
        self.beta = beta

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | TopKTargets | None,
        labels: Tensor | None,
        *,
        normalizer: Tensor | float | None = None,
    ) -> KDLossTerms:
        return kd_loss_terms(
            student_logits,
            teacher_logits,
            labels,
            temperature=self.temperature,
            alpha=self.alpha,
            ignore_index=self.ignore_index,
            divergence=self.divergence,
            beta=self.beta,
            normalizer=normalizer,
        )

    def soft(self, student_logits: Tensor, teacher_logits: Tensor | TopKTargets) -> Tensor:
        """The ``T**2 * D`` term alone, for inputs without labels (e.g. the perturbed copies of a batch)."""
        unlabelled = kd_loss_terms(
            student_logits,
            teacher_logits,
            None,
            temperature=self.temperature,
            alpha=0.0,
            ignore_index=self.ignore_index,
            divergence=self.divergence,
            beta=self.beta,
        )
        return unlabelled.kd

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, alpha={self.alpha}, ignore_index={self.ignore_index}, "
            f"divergence={self.divergence!r}, beta={self.beta}"
        )


def kd_loss_topk(
    student_logits: Tensor,
    targets: TopKTargets,
    labels: Tensor | None = None,
    *,
    temperature: float,
    alpha: float,
    ignore_index: int = -100,
    rest: bool = True,
) -> Tensor:
    """``alpha * CE + (1 - alpha) * T**2 * KL(top-K teacher || student)``, the targets as
    :mod:`distill.losses.topk` states them; ``rest=False`` renormalises the top K instead of keeping the rest mass."""
    return kd_loss_terms(
        student_logits,
        targets._replace(rest=rest),
        labels,
        temperature=temperature,
        alpha=alpha,
        ignore_index=ignore_index,
    ).loss
