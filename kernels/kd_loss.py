"""The KD loss of :func:`distill.losses.kd.kd_loss` for large output spaces, without full-size fp32 copies.

Same contract as the reference (``distill.losses.kd``): per row (position) of ``(..., V)`` logits,
``alpha * CE(label, s) + (1 - alpha) * T**2 * KL(softmax(t / T) || softmax(s / T))``, fp32 math,
averaged over rows whose label is not ``ignore_index`` (all rows when ``labels`` is None, which
requires ``alpha == 0``). Gradients flow to the student logits only.

The reference materialises several fp32 ``N x V`` tensors (log-softmaxes, probabilities, the
pointwise KL) and autograd keeps some of them for backward. Here the gradient is computed in the
forward pass, ``chunk_size`` rows at a time, and stored once in the logits' dtype; backward only
scales it. Per row, with ``p = softmax(s / T)``, ``q = softmax(t / T)``:

    d loss / d s = [alpha * (softmax(s) - onehot(label)) + (1 - alpha) * T * (p - q)] / n_rows

Implementations: ``chunked`` (plain PyTorch, any device), ``triton`` (one program per row,
online softmax over vocabulary blocks, CUDA or ``TRITON_INTERPRET=1``) and ``reference``
(``distill.losses.kd.kd_loss``). :func:`fused_kd_loss` picks one; ``impl=`` or the environment
variable ``DISTILL_KD_IMPL`` overrides the choice.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from distill.kernels.kd_rows import check_args, chunk_terms, flat_rows, mean_scale, scaled_gradients
from distill.losses.kd import kd_loss

IMPLS = ("auto", "reference", "chunked", "triton")


class _ChunkedKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, labels, temperature, alpha, ignore_index, chunk_size):
        s, t, y, keep = flat_rows(student, teacher, labels, ignore_index)
        scale = mean_scale(keep)
        total = s.new_zeros((), dtype=torch.float32)
        grad = torch.empty_like(s)
        for start in range(0, s.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            chunk_loss, chunk_grad = chunk_terms(
                s[rows],
                t[rows] if t is not None else None,
                y[rows] if y is not None else None,
                keep[rows],
                temperature,
                alpha,
                scale,
            )
            total += chunk_loss
            grad[rows] = chunk_grad.to(grad.dtype)
        ctx.save_for_backward(grad.view(student.shape))
        return total

    @staticmethod
    def backward(ctx, grad_output):
        return *scaled_gradients(ctx, grad_output), None, None, None, None, None, None


def kd_loss_chunked(
    student_logits, teacher_logits, labels=None, *, temperature, alpha, ignore_index=-100, chunk_size=128
) -> Tensor:
    """:func:`distill.losses.kd.kd_loss`, computed ``chunk_size`` rows at a time (see module docstring)."""
    check_args(teacher_logits, labels, temperature, alpha)
    return _ChunkedKD.apply(student_logits, teacher_logits, labels, temperature, alpha, ignore_index, chunk_size)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def pick_impl(student_logits: Tensor, impl: str | None = None) -> str:
    """``impl``, else ``$DISTILL_KD_IMPL``, else triton on CUDA when it imports, else chunked."""
    choice = impl or os.environ.get("DISTILL_KD_IMPL", "auto")
    if choice not in IMPLS:
        raise ValueError(f"KD loss implementation {choice!r} is not one of {IMPLS} (argument impl or DISTILL_KD_IMPL)")
    if choice != "auto":
        return choice
    return "triton" if student_logits.is_cuda and triton_available() else "chunked"


def fused_kd_loss(
    student_logits,
    teacher_logits,
    labels=None,
    *,
    temperature,
    alpha,
    ignore_index=-100,
    impl: str | None = None,
    chunk_size: int = 128,
) -> Tensor:
    """The KD loss contract through the implementation :func:`pick_impl` chooses."""
    choice = pick_impl(student_logits, impl)
    if choice == "reference":
        return kd_loss(
            student_logits, teacher_logits, labels, temperature=temperature, alpha=alpha, ignore_index=ignore_index
        )
    if choice == "triton":
        from distill.kernels.kd_loss_triton import kd_loss_triton

        return kd_loss_triton(
            student_logits, teacher_logits, labels, temperature=temperature, alpha=alpha, ignore_index=ignore_index
        )
    return kd_loss_chunked(
        student_logits,
        teacher_logits,
        labels,
        temperature=temperature,
        alpha=alpha,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
    )
