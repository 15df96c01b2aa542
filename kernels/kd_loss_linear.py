"""The KD loss fused with the output projections, so that neither model's logits exist whole.

:func:`kd_loss_linear` equals ``kd_loss(F.linear(h_s, W_s, b_s), F.linear(h_t, W_t, b_t), labels, ...)``
(the :mod:`distill.kernels.kd_loss` contract: fp32 math, mean over rows whose label is kept) for
hidden states ``(..., H)`` and language-model heads ``W`` ``(V, H)``. At a 128k vocabulary the
logits are the largest tensors of a step (8192 positions x 131072 in bf16: 2 GiB per model, four
times that in fp32), so here ``chunk_size`` rows are projected at a time: the chunk's loss and its
gradient with respect to the student's logits come from the ``chunked`` or ``triton`` row
implementation, and are turned at once into gradients for the student's hidden states, weight and
bias, accumulated in their own dtypes; backward only scales them. The teacher's projection runs
without gradient. ``impl="reference"`` projects everything and calls the reference ``kd_loss``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.kernels.kd_loss import pick_impl
from distill.kernels.kd_rows import check_args, chunk_terms, kept_rows, mean_scale, scaled_gradients
from distill.losses.kd import kd_loss
from distill.losses.topk import TopKTargets

DEFAULT_CHUNK_ROWS = {"triton": 1024, "chunked": 256}


class Settings(NamedTuple):
    temperature: float
    alpha: float
    ignore_index: int
    impl: str
    chunk_size: int
    dtype: torch.dtype  # of the heads' matmuls (see _compute_dtype)


def _row_terms(
    s: Tensor, t: Tensor | TopKTargets, y: Tensor | None, settings: Settings, scale: float
) -> tuple[Tensor, Tensor]:
    """One chunk's loss (times ``scale``) and its gradient with respect to the student's logits ``s``."""
    if settings.impl == "triton":
        from distill.kernels.kd_loss_triton import kd_rows

        return kd_rows(s, t, y, settings.temperature, settings.alpha, settings.ignore_index, scale)
    keep = kept_rows(s, y, settings.ignore_index)
    loss, grad = chunk_terms(s, t, y, keep, settings.temperature, settings.alpha, scale)
    return loss, grad.to(s.dtype)


def _compute_dtype(tensor: Tensor) -> torch.dtype:
    """The dtype the heads' matmuls run in: autocast's (bf16-mixed training) where it is on."""
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensor.dtype


def _accumulate(out: Tensor, left: Tensor, right: Tensor) -> None:
    """``out += left @ right``, in ``out``'s dtype (fp32 weight gradients of bf16 matmuls)."""
    if left.dtype == out.dtype:
        out.addmm_(left, right)
    else:
        out.add_(left @ right)


class _LinearKD(torch.autograd.Function):
    # Under autocast the matmuls run in its dtype, cast here once per step, not per chunk; the
    # gradients come back in the inputs' dtypes, as autograd requires.
    @staticmethod
    def forward(ctx, h_s, w_s, b_s, teacher_rows: Callable[[slice], Tensor | TopKTargets], labels, settings: Settings):
        with torch.autocast(h_s.device.type, enabled=False):
            return _LinearKD._forward(ctx, h_s, w_s, b_s, teacher_rows, labels, settings)

    @staticmethod
    def _forward(ctx, h_s, w_s, b_s, teacher_rows, labels, settings: Settings):
        hidden_s = h_s.reshape(-1, h_s.shape[-1])
        y = labels.reshape(-1) if labels is not None else None
        scale = mean_scale(kept_rows(hidden_s, y, settings.ignore_index))
        total = torch.zeros((), dtype=torch.float32, device=h_s.device)
        grad_h, grad_w = torch.empty_like(hidden_s), torch.zeros_like(w_s)
        grad_b = torch.zeros_like(b_s) if b_s is not None else None
        hidden, weight = hidden_s.to(settings.dtype), w_s.to(settings.dtype)
        bias = b_s.to(settings.dtype) if b_s is not None else None
        for start in range(0, hidden_s.shape[0], settings.chunk_size):
            rows = slice(start, start + settings.chunk_size)
            student_logits = F.linear(hidden[rows], weight, bias)
            loss, grad = _row_terms(
                student_logits, teacher_rows(rows), y[rows] if y is not None else None, settings, scale
            )
            del student_logits
            total += loss
            grad_h[rows] = grad @ weight
            _accumulate(grad_w, grad.t(), hidden[rows])
            if grad_b is not None:
                grad_b += grad.sum(dim=0, dtype=torch.float32).to(grad_b.dtype)
        ctx.save_for_backward(grad_h.view(h_s.shape), grad_w, grad_b)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w, grad_b = scaled_gradients(ctx, grad_output)
        return grad_h, grad_w, grad_b, None, None, None


def kd_loss_linear(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor | None = None,
    *,
    temperature: float,
    alpha: float,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    ignore_index: int = -100,
    impl: str | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """The KD loss of the two heads' logits, ``chunk_size`` rows at a time (see the module docstring).

    ``impl`` (or ``$DISTILL_KD_IMPL``) as for :func:`distill.kernels.kd_loss.fused_kd_loss`.
    ``chunk_size`` defaults to 1024 rows for Triton (one GPU program per row: enough rows to fill
    the GPU) and 256 for the PyTorch loop, whose fp32 temporaries are several times a chunk's logits.
    """
    check_args(teacher_hidden, labels, temperature, alpha)
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"the student's head has {student_weight.shape[0]} outputs and the teacher's {teacher_weight.shape[0]}:"
            " KD needs one vocabulary"
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be >= 1")
    choice = pick_impl(student_hidden, impl)
    if choice == "reference":
        with torch.no_grad():
            teacher_logits = F.linear(teacher_hidden, teacher_weight, teacher_bias)
        student_logits = F.linear(student_hidden, student_weight, student_bias)
        return kd_loss(
            student_logits, teacher_logits, labels, temperature=temperature, alpha=alpha, ignore_index=ignore_index
        )
    rows = chunk_size or DEFAULT_CHUNK_ROWS[choice]
    dtype = _compute_dtype(student_hidden)
    settings = Settings(float(temperature), float(alpha), ignore_index, choice, rows, dtype)
    hidden_t, weight_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).to(dtype), teacher_weight.to(dtype)
    bias_t = teacher_bias.to(dtype) if teacher_bias is not None else None

    def teacher_rows(chunk: slice) -> Tensor:
        return F.linear(hidden_t[chunk], weight_t, bias_t)

    return _LinearKD.apply(student_hidden, student_weight, student_bias, teacher_rows, labels, settings)


def kd_loss_linear_topk(
    student_hidden: Tensor,
    student_weight: Tensor,
    targets: TopKTargets,
    labels: Tensor | None = None,
    *,
    temperature: float,
    alpha: float,
    student_bias: Tensor | None = None,
    ignore_index: int = -100,
    impl: str | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """:func:`kd_loss_linear` against stored top-K teacher targets (:mod:`distill.losses.topk`, with the rest
    bucket) instead of a teacher head: the student's logits exist ``chunk_size`` rows at a time.

    ``impl="reference"`` projects everything and calls ``kd_loss``; every other choice runs the chunked
    PyTorch rows (the Triton kernel takes full teacher logits only)."""
    check_args(student_hidden, labels, temperature, alpha)
    if targets.indices.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(
            f"top-K targets for positions {tuple(targets.indices.shape[:-1])}, hidden states for "
            f"{tuple(student_hidden.shape[:-1])}"
        )
    if pick_impl(student_hidden, impl) == "reference":
        student_logits = F.linear(student_hidden, student_weight, student_bias)
        return kd_loss(student_logits, targets, labels, temperature=temperature, alpha=alpha, ignore_index=ignore_index)
    rows = chunk_size or DEFAULT_CHUNK_ROWS["chunked"]
    settings = Settings(float(temperature), float(alpha), ignore_index, "chunked", rows, _compute_dtype(student_hidden))
    k = targets.indices.shape[-1]
    flat = TopKTargets(
        targets.values.reshape(-1, k),
        targets.indices.reshape(-1, k),
        targets.rest_log_mass.reshape(-1),
        targets.temperature,
    )

    def teacher_rows(chunk: slice) -> TopKTargets:
        return TopKTargets(flat.values[chunk], flat.indices[chunk], flat.rest_log_mass[chunk], flat.temperature)

    return _LinearKD.apply(student_hidden, student_weight, student_bias, teacher_rows, labels, settings)
