"""Divergences between a teacher distribution q and a student distribution p, for knowledge distillation.

Contract of every member: inputs are the student's and the teacher's LOG-probabilities over the same support
(the last dimension, same shape ``(..., C)``); half-precision inputs are upcast to fp32 (fp64 stays fp64); the
result is the per-row divergence summed over the last dimension, shape ``(...)``. A term whose weighting
probability is exactly 0 contributes exactly 0 (no ``0 * inf`` NaN, in the value or in the gradient), so
classes a distribution rules out (``-inf`` log-probability) are fine. Members, by name (:data:`DIVERGENCES`):

* ``forward_kl``: ``KL(q || p) = sum q (log q - log p)``, mass-covering; Hinton et al.'s KD term.
* ``reverse_kl``: ``KL(p || q) = sum p (log p - log q)``, mode-seeking (MiniLLM, GKD).
* ``jsd``: generalised Jensen-Shannon with ``m = beta q + (1 - beta) p``::

      jsd_beta = (beta KL(q || m) + (1 - beta) KL(p || m)) / (beta (1 - beta))

  The division by ``beta (1 - beta)`` makes it continuous on ``[0, 1]``: its limit at ``beta -> 0`` is
  ``KL(q || p)`` and at ``beta -> 1`` is ``KL(p || q)``, which ``beta = 0`` and ``beta = 1`` return exactly.
  At ``beta = 0.5`` it is ``4 * JSD``. Unnormalised, ``beta KL(q || m) + (1 - beta) KL(p || m)`` tends to 0 at
  both ends yet is set to the forward / reverse KL there, so it jumps (TRL's ``generalized_jsd``, trl issues
  #2202 and #6780); normalised, a sweep over ``beta`` moves smoothly from forward to reverse KL.
* ``skew_kl`` (DistiLLM): ``KL(q || beta q + (1 - beta) p)``, ``beta = 0`` is exactly ``forward_kl``.
* ``skew_rkl`` (DistiLLM): ``KL(p || beta p + (1 - beta) q)``, ``beta = 0`` is exactly ``reverse_kl``.
  Both skew members tend to 0 as ``beta -> 1`` and are identically 0 there, so ``beta = 1`` is rejected.
* ``tvd``: total variation ``0.5 * sum |p - q|``.

``beta`` must be in ``[0, 1]`` for every member (members without a weight ignore it) and in ``[0, 1)`` for the
skew members; :func:`check_divergence_args` raises ``ValueError`` naming the bad value. The KL to a mixture is
evaluated in the form ``sum a (m/a - 1 - log(m/a))`` with ``log(m/a)`` from ``logaddexp``: every term is
``>= 0`` and of order ``w**2`` for a mixture weight ``w``, so ``jsd`` stays accurate when divided by a
``beta (1 - beta)`` near 0 (the plain ``sum a (log a - log m)`` loses everything to fp32 rounding there).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_rkl", "tvd")
_SKEWED = ("skew_kl", "skew_rkl")


def check_divergence_args(name: str, beta: float) -> None:
    """Raise ``ValueError`` naming the value if ``name`` is not a member or ``beta`` is out of its range."""
    if name not in DIVERGENCES:
        raise ValueError(f"divergence={name!r} is not one of {', '.join(DIVERGENCES)}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta!r} must be in [0, 1]")
    if name in _SKEWED and not beta < 1.0:
        raise ValueError(f"beta={beta!r} must be in [0, 1) for divergence={name!r}: it is identically 0 at beta=1")


def _at_least_fp32(log_probs: Tensor) -> Tensor:
    return log_probs if log_probs.dtype == torch.float64 else log_probs.float()


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """``KL(a || b)`` summed over the last dimension; entries with ``a = 0`` give 0, value and gradient."""
    a = log_a.exp()
    # Zeroing the log-ratio itself (not only the product) keeps 0 * inf out of the backward pass too.
    log_ratio = torch.where(a > 0, log_a - log_b, 0.0)
    return (a * log_ratio).sum(-1)


def _kl_to_mixture(log_a: Tensor, log_b: Tensor, weight: float) -> Tensor:
    """``KL(a || m)`` with ``m = (1 - weight) a + weight b``, ``0 < weight < 1``, accurate for small weights.

    With ``u = log(m / a)``, ``KL(a || m) = sum a (exp(u) - 1 - u)`` because ``sum (m - a) = 0``; each term is
    ``>= 0`` and ``O(weight**2)``. ``u = log((1 - weight) + weight * b / a)`` is taken by ``logaddexp`` from the
    log-ratio, so it is accurate relative to its own size, not to ``|log a|``.
    """
    a = log_a.exp()
    present = a > 0
    log_b_over_a = torch.where(present, log_b - log_a, 0.0)
    u = torch.logaddexp(log_b_over_a + math.log(weight), log_b_over_a.new_tensor(math.log1p(-weight)))
    # a * expm1(u) can overflow for tiny a and huge u; m - a = exp(log a + u) - a is exact enough there.
    # Each branch sees a clamped u so that the branch torch.where discards stays finite in the backward pass.
    small, large = u.clamp(max=1.0), u.clamp(min=1.0)
    near = a * (torch.expm1(small) - small)
    far = (torch.exp(log_a + large) - a) - a * large
    return torch.where(present, torch.where(u <= 1.0, near, far), 0.0).sum(-1)


def forward_kl(log_p_student: Tensor, log_q_teacher: Tensor, beta: float = 0.5) -> Tensor:
    """``KL(q || p)`` per row; ``beta`` is ignored."""
    return _kl(_at_least_fp32(log_q_teacher), _at_least_fp32(log_p_student))


def reverse_kl(log_p_student: Tensor, log_q_teacher: Tensor, beta: float = 0.5) -> Tensor:
    """``KL(p || q)`` per row; ``beta`` is ignored."""
    return _kl(_at_least_fp32(log_p_student), _at_least_fp32(log_q_teacher))


def jsd(log_p_student: Tensor, log_q_teacher: Tensor, beta: float = 0.5) -> Tensor:
    """``(beta KL(q || m) + (1 - beta) KL(p || m)) / (beta (1 - beta))``, ``m = beta q + (1 - beta) p``."""
    if beta == 0.0:
        return forward_kl(log_p_student, log_q_teacher)
    if beta == 1.0:
        return reverse_kl(log_p_student, log_q_teacher)
    log_p, log_q = _at_least_fp32(log_p_student), _at_least_fp32(log_q_teacher)
    # m = q + (1 - beta)(p - q) = p + beta (q - p); each KL is divided by the weight that makes it small.
    return _kl_to_mixture(log_q, log_p, 1.0 - beta) / (1.0 - beta) + _kl_to_mixture(log_p, log_q, beta) / beta


def skew_kl(log_p_student: Tensor, log_q_teacher: Tensor, beta: float = 0.5) -> Tensor:
    """``KL(q || beta q + (1 - beta) p)`` per row (DistiLLM's skew KL); ``beta`` in ``[0, 1)``."""
    if beta == 0.0:
        return forward_kl(log_p_student, log_q_teacher)
    return _kl_to_mixture(_at_least_fp32(log_q_teacher), _at_least_fp32(log_p_student), 1.0 - beta)


def skew_rkl(log_p_student: Tensor, log_q_teacher: Tensor, beta: float = 0.5) -> Tensor:
    """``KL(p || beta p + (1 - beta) q)`` per row (DistiLLM's skew reverse KL); ``beta`` in ``[0, 1)``."""
    if beta == 0.0:
        return reverse_kl(log_p_student, log_q_teacher)
    return _kl_to_mixture(_at_least_fp32(log_p_student), _at_least_fp32(log_q_teacher), 1.0 - beta)


def tvd(log_p_student: Tensor, log_q_teacher: Tensor, beta: float = 0.5) -> Tensor:
    """Total variation ``0.5 * sum |p - q|`` per row; ``beta`` is ignored."""
    return 0.5 * (_at_least_fp32(log_p_student).exp() - _at_least_fp32(log_q_teacher).exp()).abs().sum(-1)


_MEMBERS: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_kl": skew_kl,
    "skew_rkl": skew_rkl,
    "tvd": tvd,
}


def divergence(log_p_student: Tensor, log_q_teacher: Tensor, name: str = "forward_kl", beta: float = 0.5) -> Tensor:
    """The member ``name`` of :data:`DIVERGENCES` between teacher ``q`` and student ``p``, per row (see module)."""
    check_divergence_args(name, beta)
    return _MEMBERS[name](log_p_student, log_q_teacher, beta)
