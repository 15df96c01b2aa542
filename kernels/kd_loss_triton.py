"""Triton kernel for the large-vocabulary KD loss (see :mod:`distill.kernels.kd_loss` for the contract).

One program per row: a first pass over vocabulary blocks keeps running maxima and sums for
``softmax(s / T)``, ``softmax(t / T)`` and ``softmax(s)`` (online softmax, fp32); a second pass
accumulates the KL and writes the row's gradient in the logits' dtype. Nothing of size
``N x V`` is allocated besides the gradient. Runs on CUDA, and on CPU tensors under
``TRITON_INTERPRET=1`` (how the tests exercise it without a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from distill.kernels.kd_rows import check_args, flat_rows, mean_scale, scaled_gradients


@triton.jit
def _online(m, d, x):
    """Fold block ``x`` into a running (max, sum of exp) pair."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    # While every logit so far is -inf (a teacher ruling out a whole block), exp(-inf - -inf) is NaN:
    # shift by 0 instead, which leaves the sum at exactly 0.
    shift = tl.where(m_new == -float("inf"), 0.0, m_new)
    return m_new, d * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)


@triton.jit
def _kd_rows_kernel(
    s_ptr,
    t_ptr,
    y_ptr,
    grad_ptr,
    loss_ptr,
    vocab,
    s_stride,
    t_stride,
    g_stride,
    temperature,
    alpha,
    scale,
    ignore_index,
    HAS_KD: tl.constexpr,
    HAS_CE: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row, t_row, g_row = s_ptr + row * s_stride, t_ptr + row * t_stride, grad_ptr + row * g_stride
    keep = 1.0
    label = 0
    if HAS_LABELS:
        label = tl.load(y_ptr + row).to(tl.int32)
        keep = tl.where(label != ignore_index, 1.0, 0.0)
        label = tl.where(label != ignore_index, label, 0)
    inv_t = 1.0 / temperature
    # Sums start at 1 with maxima at -inf: the first block rescales them to 0 (exp(-inf) = 0), and a
    # softmax this row does not need keeps a finite log instead of log(0).
    m_p, d_p, m_q, d_q, m_1, d_1 = -float("inf"), 1.0, -float("inf"), 1.0, -float("inf"), 1.0
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < vocab
        s = tl.load(s_row + offs, mask=inside, other=-float("inf")).to(tl.float32)
        if HAS_KD:
            t = tl.load(t_row + offs, mask=inside, other=-float("inf")).to(tl.float32)
            m_p, d_p = _online(m_p, d_p, s * inv_t)
            m_q, d_q = _online(m_q, d_q, t * inv_t)
        if HAS_CE:
            m_1, d_1 = _online(m_1, d_1, s)
    lse_p, lse_q, lse_1 = m_p + tl.log(d_p), m_q + tl.log(d_q), m_1 + tl.log(d_1)
    kl = 0.0
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < vocab
        s = tl.load(s_row + offs, mask=inside, other=0.0).to(tl.float32)
        grad = tl.zeros([BLOCK], dtype=tl.float32)
        if HAS_KD:
            t = tl.load(t_row + offs, mask=inside, other=0.0).to(tl.float32)
            log_p = s * inv_t - lse_p
            log_q = t * inv_t - lse_q
            q = tl.exp(log_q)
            kl += tl.sum(tl.where(inside & (q > 0), q * (log_q - log_p), 0.0), axis=0)
            grad += (1.0 - alpha) * temperature * (tl.exp(log_p) - q)
        if HAS_CE:
            grad += alpha * (tl.exp(s - lse_1) - tl.where(offs == label, 1.0, 0.0))
        grad = grad * (scale * keep)
        tl.store(g_row + offs, grad.to(grad_ptr.dtype.element_ty), mask=inside)
    loss = (1.0 - alpha) * temperature * temperature * kl
    if HAS_CE:
        loss += alpha * (lse_1 - tl.load(s_row + label).to(tl.float32))
    tl.store(loss_ptr + row, loss * scale * keep)


# Launch settings: vocabulary elements per block and warps per row program. bench/kd_triton_configs.py
# times the alternatives on a GPU; docs/results/bench.md has the table these come from.
BLOCK_SIZE, NUM_WARPS = 2048, 4


def kd_rows(
    s: Tensor,
    t: Tensor | None,
    y: Tensor | None,
    temperature: float,
    alpha: float,
    ignore_index: int,
    scale: float,
    block_size: int = BLOCK_SIZE,
    num_warps: int = NUM_WARPS,
) -> tuple[Tensor, Tensor]:
    """Loss (fp32, each row's term times ``scale``, summed) and ``d loss / d s`` of ``(N, V)`` rows."""
    s = s.contiguous()
    t = t.contiguous() if t is not None else s
    y = y.contiguous() if y is not None else None
    rows, vocab = s.shape
    grad = torch.empty_like(s)
    losses = torch.empty(rows, dtype=torch.float32, device=s.device)
    _kd_rows_kernel[(rows,)](
        s,
        t,
        y if y is not None else s,
        grad,
        losses,
        vocab,
        s.stride(0),
        t.stride(0),
        grad.stride(0),
        float(temperature),
        float(alpha),
        scale,
        ignore_index,
        HAS_KD=alpha < 1,
        HAS_CE=alpha > 0,
        HAS_LABELS=y is not None,
        BLOCK=min(block_size, triton.next_power_of_2(vocab)),
        num_warps=num_warps,
    )
    return losses.sum(), grad


class _TritonKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, labels, temperature, alpha, ignore_index):
        s, t, y, keep = flat_rows(student, teacher, labels, ignore_index)
        loss, grad = kd_rows(s, t, y, temperature, alpha, ignore_index, mean_scale(keep))
        ctx.save_for_backward(grad.view(student.shape))
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        return *scaled_gradients(ctx, grad_output), None, None, None, None, None


def kd_loss_triton(student_logits, teacher_logits, labels=None, *, temperature, alpha, ignore_index=-100) -> Tensor:
    """:func:`distill.losses.kd.kd_loss` through the Triton kernel above."""
    check_args(teacher_logits, labels, temperature, alpha)
    return _TritonKD.apply(student_logits, teacher_logits, labels, temperature, alpha, ignore_index)
