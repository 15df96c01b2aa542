"""Top-K teacher targets: what a teacher-logit cache keeps for language-model vocabularies.

Storing ``N x V`` teacher logits is out of the question at V = 32k-256k, so a cache keeps, per
position, the teacher's K largest logits and their class indices (``distill.teacher_cache_topk``
has :mod:`distill.stores.teacher_logits` store exactly these). Contract of the targets made by
:func:`topk_targets` and read by :func:`topk_log_probs` / :func:`topk_kl` (``distill.losses.kd.kd_loss`` and
``KDLoss`` take :class:`TopKTargets` wherever they take teacher logits):

* ``q_k = softmax(t / T)_k`` for the K kept classes, from the full-vocabulary softmax at the
  temperature the targets were made with (``TopKTargets.temperature``; using them at another T
  is an error, since the missing mass depends on T).
* ``TopKTargets.rest=True`` (default): the mass outside the top K, ``r = 1 - sum_k q_k``, is kept as one
  "rest" bucket; the student's matching bucket is ``1 - sum_k p_k``. The KD term is then the chosen
  divergence (:mod:`distill.losses.divergences`; KL by default, :func:`topk_kl`) between two (K + 1)-way
  distributions, exact when the teacher puts no mass outside its top K.
* ``rest=False``: ``q`` is renormalised over the K classes and compared with the student's
  distribution renormalised over the same K classes.
* :func:`topk_log_probs` builds both log-distributions; every divergence is applied to them unchanged.
* Reduction, masking, ``T**2`` and the CE term are those of ``distill.losses.kd.kd_loss``; all math in fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses.divergences import forward_kl


class TopKTargets(NamedTuple):
    """Per position: the teacher's K largest logits, their indices, and log of the rest mass at ``temperature``."""

    values: Tensor  # (..., K) teacher logits
    indices: Tensor  # (..., K) int64 class ids
    rest_log_mass: Tensor  # (...) log(1 - sum_k q_k) at `temperature`; -inf when nothing is left
    temperature: float
    rest: bool = True  # compare (K + 1)-way with a rest bucket; False: renormalise both over the K classes


def topk_targets(teacher_logits: Tensor, k: int, temperature: float) -> TopKTargets:
    """Keep the ``k`` largest teacher logits per position and the log of the mass they leave out."""
    values, indices = largest_logits(teacher_logits, k)
    (rest,) = outside_log_masses(teacher_logits.float(), indices, (temperature,)).unbind(-1)
    return TopKTargets(values, indices, rest, temperature)


# Rows of the vocabulary-wide buffer :func:`outside_log_masses` works in: 32 x 49,152 fp32 logits are 6 MB.
MASS_ROWS = 32


def largest_logits(teacher_logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest fp32 logits per position and their indices: the same at every temperature, which
    only rescales the logits and so keeps their order."""
    if not 0 < k <= teacher_logits.shape[-1]:
        raise ValueError(f"k={k!r} must be in [1, vocabulary size {teacher_logits.shape[-1]}]")
    values, indices = teacher_logits.float().topk(k, dim=-1)
    return values, indices


def outside_log_masses(logits: Tensor, indices: Tensor, temperatures: tuple[float, ...]) -> Tensor:
    """``(..., len(temperatures))``: log of the softmax mass at each temperature outside ``indices``, which hold
    each row's largest logit (:func:`largest_logits`).

    Summed directly, as :func:`outside_log_mass` does, shifted by that largest logit; the store's teacher pass
    computes these for every position at several temperatures, so rows go a few at a time through one buffer
    that stays in cache (one pass over it for the shift and scale, one for the exponential, one for the sum).
    A mass below ``exp(-87)`` of the largest class's is 0 (log -inf), as none is in fp32."""
    vocabulary, kept_count = logits.shape[-1], indices.shape[-1]
    # Targets carry no gradient, and the buffer's in-place passes could not record one.
    rows, kept_indices = logits.detach().reshape(-1, vocabulary).float(), indices.reshape(-1, kept_count)
    masses = rows.new_empty(rows.shape[0], len(temperatures), dtype=torch.float32)
    buffer = rows.new_empty(min(MASS_ROWS, rows.shape[0]), vocabulary, dtype=torch.float32)
    for start in range(0, rows.shape[0], MASS_ROWS):
        block, kept_index = rows[start : start + MASS_ROWS], kept_indices[start : start + MASS_ROWS]
        peak = block.gather(-1, kept_index).amax(-1, keepdim=True)
        for column, temperature in enumerate(temperatures):
            weights = torch.add(peak / -temperature, block, alpha=1 / temperature, out=buffer[: len(block)]).exp_()
            kept = weights.gather(-1, kept_index).sum(-1)
            outside = weights.scatter_(-1, kept_index, 0.0).sum(-1)
            masses[start : start + len(block), column] = outside.log() - (outside + kept).log()
    return masses.reshape(*indices.shape[:-1], len(temperatures))


def outside_log_mass(scaled_logits: Tensor, indices: Tensor) -> Tensor:
    """log of the softmax mass outside ``indices``, summed directly (exactly -inf when nothing is outside)."""
    outside = scaled_logits.scatter(-1, indices, float("-inf"))
    return outside.logsumexp(-1) - scaled_logits.logsumexp(-1)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and -inf (Maechler 2012)."""
    x = x.clamp(max=0.0)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def topk_log_probs(student: Tensor, targets: TopKTargets, temperature: float) -> tuple[Tensor, Tensor]:
    """The student's and the teacher's fp32 log-distributions that the contract compares, ``(log_p, log_q)``.

    ``(..., K + 1)`` with the rest bucket last when ``targets.rest``, else ``(..., K)`` renormalised over the K.
    """
    if abs(targets.temperature - temperature) > 1e-12:
        raise ValueError(f"top-K targets were made at T={targets.temperature!r}, not T={temperature!r}")
    scaled = student / temperature
    log_p = F.log_softmax(scaled, dim=-1).gather(-1, targets.indices)
    log_q = targets.values / temperature - (targets.values / temperature).logsumexp(-1, keepdim=True)
    if targets.rest:
        log_kept = log1mexp(targets.rest_log_mass)  # log sum_k q_k
        log_q = log_q + log_kept.unsqueeze(-1)
        log_q = torch.cat([log_q, targets.rest_log_mass.unsqueeze(-1)], dim=-1)
        log_p = torch.cat([log_p, outside_log_mass(scaled, targets.indices).unsqueeze(-1)], dim=-1)
    else:
        log_p = log_p - log_p.logsumexp(-1, keepdim=True)
    return log_p, log_q


def topk_kl(student: Tensor, targets: TopKTargets, temperature: float) -> Tensor:
    """Per-position KL between the teacher's top-K (+ rest) distribution and the student's fp32 logits."""
    return forward_kl(*topk_log_probs(student, targets, temperature))
