"""What every fused KD-loss implementation shares (chunked PyTorch, Triton, the LM-head kernels): the rows
that count and their mean scale, the argument checks, one chunk's loss and gradient in plain PyTorch, and
the backward that scales the gradient the forward stored. Public, so the implementations import this module
and not one another."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from distill.losses.kd import check_kd_args
from distill.losses.topk import TopKTargets, log1mexp


def flat_rows(student: Tensor, teacher: Tensor | None, labels: Tensor | None, ignore_index: int):
    vocab = student.shape[-1]
    s = student.reshape(-1, vocab)
    t = teacher.reshape(-1, vocab) if teacher is not None else None
    y = labels.reshape(-1) if labels is not None else None
    return s, t, y, kept_rows(s, y, ignore_index)


def kept_rows(s: Tensor, y: Tensor | None, ignore_index: int) -> Tensor:
    """Which rows of ``s`` count: those whose label is not ``ignore_index`` (all rows without labels)."""
    return (y != ignore_index) if y is not None else torch.ones(s.shape[0], dtype=torch.bool, device=s.device)


def mean_scale(keep: Tensor) -> float:
    """``1 / (rows that count)``: the loss is a mean over kept rows (and stays finite with none)."""
    return 1.0 / max(int(keep.sum()), 1)


def chunk_terms(s, t, y, keep, temperature: float, alpha: float, scale: float) -> tuple[Tensor, Tensor]:
    """Loss sum (already divided by the row count) and gradient of one chunk of rows, fp32.

    ``t`` is the teacher's logits for the rows, or their top-K targets (:class:`distill.losses.topk.TopKTargets`,
    with the rest bucket). In place wherever a temporary can be reused: each chunk-sized fp32 buffer is
    a full pass of memory traffic, and the peak is a handful of them."""
    s32 = s.float()
    if isinstance(t, TopKTargets) and alpha < 1:
        return _topk_kl_and_ce(s32, t, y, keep, temperature, alpha, scale)
    loss = s32.new_zeros(())
    grad = s32.new_zeros(s32.shape)
    if alpha > 0:
        loss = loss + _add_ce(grad, s32, y, keep, alpha)
    if alpha < 1:
        loss = loss + _add_soft_kl(grad, s32, t, keep, temperature, alpha)
    grad.mul_((keep[:, None] * scale).to(grad.dtype))
    return loss * scale, grad


def _add_ce(grad: Tensor, s32: Tensor, y: Tensor, keep: Tensor, alpha: float) -> Tensor:
    """``alpha`` times the summed CE of the kept rows; adds its gradient to ``grad``."""
    log_p1 = torch.log_softmax(s32, dim=-1)
    safe = torch.where(keep, y, 0)
    ce = -log_p1.gather(1, safe[:, None]).squeeze(1)
    grad.add_(log_p1.exp_(), alpha=alpha)
    grad.scatter_add_(1, safe[:, None], torch.full_like(ce[:, None], -alpha))
    return alpha * (ce * keep).sum()


def _add_soft_kl(grad: Tensor, s32: Tensor, t: Tensor, keep: Tensor, temperature: float, alpha: float) -> Tensor:
    """``(1 - alpha) T^2`` times the summed KL to the teacher's full softmax; adds its gradient."""
    log_p = torch.log_softmax(s32 / temperature, dim=-1)
    log_q = torch.log_softmax(t.float() / temperature, dim=-1)
    q = log_q.exp()
    pointwise_kl = log_q.sub_(log_p).mul_(q).masked_fill_(q == 0, 0.0)  # 0 * log 0 = 0
    loss = (1 - alpha) * temperature**2 * (pointwise_kl.sum(dim=-1) * keep).sum()
    del pointwise_kl, log_q
    grad.add_(log_p.exp_().sub_(q), alpha=(1 - alpha) * temperature)
    return loss


# Top-K log mass above which the student's rest is summed directly (a top-K mass above 1 - 1e-3).
CONFIDENT_KEPT_LOG_MASS = math.log1p(-1e-3)
MAX_LOG_RATIO = 80.0


class _TopKTerms(NamedTuple):
    kl: Tensor  # per row, the (K + 1)-way KL
    top_grad: Tensor  # (rows, K): p_k - q_k, the KL's gradient on the top K times T
    outside_factor: Tensor  # per row: 1 - q_r / p_r, the gradient outside the top K is p_j times it (times 1/T)


def _topk_terms(log_p: Tensor, targets: TopKTargets, temperature: float) -> _TopKTerms:
    """With ``p = softmax(s / T)`` and the rest masses ``p_r = 1 - sum_K p``, ``q_r``: the gradient of the KL
    with respect to ``s_j`` is ``(p_j - q_j) / T`` for ``j`` in the top K and ``p_j (1 - q_r / p_r) / T``
    outside it."""
    if not targets.rest:
        raise ValueError("the fused top-K loss compares (K + 1)-way distributions: targets need rest=True")
    log_p_k = log_p.gather(1, targets.indices)
    log_p_rest = _student_rest_log_mass(log_p, targets.indices, log_p_k)
    log_q_rest = targets.rest_log_mass.float()
    scaled = targets.values.float() / temperature
    log_q_k = scaled - scaled.logsumexp(-1, keepdim=True) + log1mexp(log_q_rest)[:, None]
    q_k, q_rest = log_q_k.exp(), log_q_rest.exp()
    kl = torch.where(q_k > 0, q_k * (log_q_k - log_p_k), 0.0).sum(-1)
    kl = kl + torch.where(q_rest > 0, q_rest * (log_q_rest - log_p_rest), 0.0)
    # q_r / p_r multiplies p_j <= p_r outside the top K: capped where it would overflow, so that an outside p_j
    # that underflowed to 0 gives 0, not 0 * inf. Such a row's outside gradient then falls short of its exact
    # value only below exp(-80) of the teacher's rest mass.
    ratio = torch.where(q_rest > 0, torch.exp((log_q_rest - log_p_rest).clamp(max=MAX_LOG_RATIO)), 0.0)
    return _TopKTerms(kl, log_p_k.exp() - q_k, 1 - ratio)


def _student_rest_log_mass(log_p: Tensor, indices: Tensor, log_p_k: Tensor) -> Tensor:
    """log of the student's mass outside its top-K slots. ``1 - sum_K p`` loses a rest below about 1e-6 to fp32
    cancellation (and one below 6e-8 to -inf, which made the KL and its gradient inf and NaN once a student
    grew confident); rows whose top K hold more than ``1 - 1e-3`` sum their outside directly, as the
    reference (:func:`distill.losses.topk.outside_log_mass`) does for every row."""
    kept = log_p_k.logsumexp(-1)
    rest = log1mexp(kept)
    confident = (kept > CONFIDENT_KEPT_LOG_MASS).nonzero().squeeze(1)
    if confident.numel():
        rows = log_p.index_select(0, confident).scatter_(1, indices.index_select(0, confident), float("-inf"))
        rest[confident] = rows.logsumexp(-1)
    return rest


def _topk_kl_and_ce(
    s32: Tensor, targets: TopKTargets, y: Tensor | None, keep: Tensor, temperature: float, alpha: float, scale: float
) -> tuple[Tensor, Tensor]:
    """:func:`chunk_terms` against top-K targets (the (K + 1)-way KL of :mod:`distill.losses.topk`, gradient in
    :func:`_topk_terms`), the gradient built in the buffer of the KL's softmax ``p = softmax(s / T)``: in ``s`` it is
    ``(1 - alpha) T (p_j (1 - q_r / p_r))`` outside the top K and ``(1 - alpha) T (p_k - q_k)`` on it, plus
    ``alpha (softmax(s) - onehot(y))`` for CE. At T = 1 CE reads the same softmax: one exponential pass over the
    vocabulary instead of two; at any T, no zero-filled gradient buffer and no separate additions into it."""
    log_p = torch.log_softmax(s32 if temperature == 1 else s32 / temperature, dim=-1)
    terms = _topk_terms(log_p, targets, temperature)
    loss = (1 - alpha) * temperature**2 * (terms.kl * keep).sum()
    row_scale = (keep * scale).to(s32.dtype)[:, None]
    kd = (1 - alpha) * temperature  # d(T^2 KL)/ds = T (p - q)
    shared = temperature == 1 and alpha > 0  # CE's softmax is the KL's
    safe = torch.where(keep, y, 0)[:, None] if alpha > 0 else None
    log_p_ce = log_p if shared else torch.log_softmax(s32, dim=-1) if alpha > 0 else None
    if alpha > 0:
        loss = loss + alpha * (-log_p_ce.gather(1, safe).squeeze(1) * keep).sum()
    top_grad = kd * terms.top_grad + (alpha * log_p.gather(1, targets.indices).exp() if shared else 0.0)
    outside = kd * terms.outside_factor + (alpha if shared else 0.0)
    grad = log_p.exp_().mul_(outside[:, None] * row_scale)
    grad.scatter_(1, targets.indices, top_grad * row_scale)
    if alpha > 0 and not shared:
        grad.addcmul_(log_p_ce.exp_(), row_scale, value=alpha)
    if alpha > 0:
        grad.scatter_add_(1, safe, (-alpha * row_scale).expand_as(safe).to(grad.dtype))
    return loss * scale, grad


def scaled_gradients(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
    """The gradients stored by forward, scaled in place: a second N x V copy would double the peak.

    The buffers are used up, so backward runs once per forward (no ``retain_graph``)."""
    if getattr(ctx, "used", False):
        raise RuntimeError("the fused KD loss supports one backward per forward (no retain_graph)")
    ctx.used = True
    return tuple(grad.mul_(grad_output.to(grad.dtype)) if grad is not None else None for grad in ctx.saved_tensors)


def check_args(teacher_logits, labels, temperature: float, alpha: float) -> None:
    """The reference's argument checks, plus the missing-input rules of every fused implementation."""
    check_kd_args(temperature, alpha)
    if labels is None and alpha > 0:
        raise ValueError(f"labels=None requires alpha=0 (got alpha={alpha!r}): CE needs labels")
    if teacher_logits is None and alpha < 1:
        raise ValueError(f"teacher_logits=None requires alpha=1 (got alpha={alpha!r})")
