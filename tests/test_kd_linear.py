"""The KD loss fused with the output projections, against the reference on full logits.

The Triton rows run under TRITON_INTERPRET=1 without a GPU (conftest.py). Liger-Kernel's fused
linear distillation loss is checked against the same contract, so that bench/kd_loss.py compares
equal work.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from distill.kernels.kd_loss import triton_available
from distill.kernels.kd_loss_linear import kd_loss_linear
from distill.losses.kd import kd_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ["chunked", pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason="no triton"))]


def heads(dtype=torch.float32, rows=21, hidden=16, vocab=300, bias=True, seed=0):
    """Student and teacher hidden states ``(3, rows // 3, hidden)``, heads ``(vocab, hidden)``, labels."""
    generator = torch.Generator().manual_seed(seed)

    def make(*shape, grad=False):
        return torch.randn(*shape, generator=generator).to(DEVICE, dtype).requires_grad_(grad)

    student = [make(3, rows // 3, hidden, grad=True), make(vocab, hidden, grad=True)]
    student.append(make(vocab, grad=True) if bias else None)
    teacher = [make(3, rows // 3, hidden), make(vocab, hidden), make(vocab) if bias else None]
    labels = torch.randint(0, vocab, (3, rows // 3), generator=generator).to(DEVICE)
    labels[0, ::2] = -100
    return student, teacher, labels


def reference(student, teacher, labels, **settings):
    logits = F.linear(*student), F.linear(*teacher).detach()
    return kd_loss(*logits, labels, **settings)


def fused(student, teacher, labels, impl, **settings):
    (h_s, w_s, b_s), (h_t, w_t, b_t) = student, teacher
    return kd_loss_linear(h_s, w_s, h_t, w_t, labels, student_bias=b_s, teacher_bias=b_t, impl=impl, **settings)


def value_and_grads(loss_fn, student, *args, **kwargs):
    loss = loss_fn(student, *args, **kwargs)
    params = [tensor for tensor in student if tensor is not None]
    return loss.detach().float(), [grad.float() for grad in torch.autograd.grad(loss, params)]


def assert_close_grads(actual, expected, rtol: float) -> None:
    for grad, want in zip(actual, expected, strict=True):
        assert (grad - want).abs().max() <= rtol * want.abs().max()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("temperature", "alpha"), [(1.0, 0.0), (2.0, 0.5), (4.0, 0.9), (8.0, 1.0)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_the_reference_in_value_and_gradients(impl: str, temperature: float, alpha: float, bias: bool) -> None:
    student, teacher, labels = heads(bias=bias)
    settings = dict(temperature=temperature, alpha=alpha)
    expected, expected_grads = value_and_grads(reference, student, teacher, labels, **settings)
    actual, grads = value_and_grads(fused, student, teacher, labels, impl, chunk_size=4, **settings)
    assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-6)
    assert_close_grads(grads, expected_grads, 1e-5)
    hidden_grad = grads[0]
    assert not hidden_grad[0, ::2].any()  # ignored rows send nothing back


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_heads_without_labels(impl: str) -> None:
    student, teacher, _ = heads(torch.bfloat16)
    settings = dict(temperature=2.0, alpha=0.0)
    expected, expected_grads = value_and_grads(reference, student, teacher, None, **settings)
    actual, grads = value_and_grads(fused, student, teacher, None, impl, chunk_size=8, **settings)
    assert torch.allclose(actual, expected, rtol=1e-3)
    assert_close_grads(grads, expected_grads, 2e-2)  # bf16 logits and gradients on both sides


def test_reference_impl_and_one_chunk_equal_the_chunked_path() -> None:
    student, teacher, labels = heads()
    settings = dict(temperature=2.0, alpha=0.5)
    chunked, chunked_grads = value_and_grads(fused, student, teacher, labels, "chunked", chunk_size=5, **settings)
    for impl, chunk_size in (("reference", 1024), ("chunked", 1024)):
        loss, grads = value_and_grads(fused, student, teacher, labels, impl, chunk_size=chunk_size, **settings)
        assert torch.allclose(loss, chunked, rtol=1e-6)
        assert_close_grads(grads, chunked_grads, 1e-5)


def test_bad_arguments_are_named() -> None:
    student, teacher, labels = heads(bias=False)
    other_vocab = [teacher[0], teacher[1][:100], None]
    with pytest.raises(ValueError, match="300 outputs and the teacher's 100"):
        fused(student, other_vocab, labels, "chunked", temperature=2.0, alpha=0.5)
    with pytest.raises(ValueError, match="chunk_size=0"):
        fused(student, teacher, labels, "chunked", temperature=2.0, alpha=0.5, chunk_size=0)
    with pytest.raises(ValueError, match=r"alpha=1\.5"):
        fused(student, teacher, labels, "chunked", temperature=2.0, alpha=1.5)


def test_backward_runs_once_per_forward() -> None:
    student, teacher, labels = heads()
    loss = fused(student, teacher, labels, "chunked", temperature=2.0, alpha=0.5)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel is not installed")
def test_liger_fused_linear_jsd_at_beta_0_is_this_contract() -> None:
    """bench/kd_loss.py's Liger arm: forward KL (beta=0), CE at T=1, soft weight (1 - alpha) * T**2."""
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    student, teacher, labels = heads()
    liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.3, weight_soft_loss=0.7 * 4.0, beta=0.0, temperature=2.0)
    liger.compiled = False  # torch.compile adds a minute on CPU and nothing to the values

    def liger_loss(student, teacher, labels):
        h_s, h_t = student[0].reshape(-1, 16), teacher[0].reshape(-1, 16)
        return liger(h_s, student[1], h_t, teacher[1], labels.reshape(-1), student[2], teacher[2])

    expected, expected_grads = value_and_grads(reference, student, teacher, labels, temperature=2.0, alpha=0.3)
    actual, grads = value_and_grads(liger_loss, student, teacher, labels)
    assert torch.allclose(actual, expected, rtol=1e-5)
    assert_close_grads(grads, expected_grads, 1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
@pytest.mark.parametrize("temperature", [1.0, 2.0])  # at 1, CE and the KL share one softmax (kd_rows)
def test_topk_targets_through_the_head_equal_the_reference(alpha: float, temperature: float) -> None:
    """kd_loss_linear_topk: the student's logits in chunks against stored top-K targets (with the rest bucket)."""
    from distill.kernels.kd_loss_linear import kd_loss_linear_topk
    from distill.losses.kd import kd_loss
    from distill.losses.topk import topk_targets

    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 5, 8, requires_grad=True), torch.randn(40, 8, requires_grad=True)
    targets = topk_targets(torch.randn(3, 5, 40) * 3, 6, temperature)
    labels = torch.randint(0, 40, (3, 5))
    labels[0, :2] = -100
    results = []
    for impl in ("chunked", "reference"):
        loss = kd_loss_linear_topk(
            hidden, weight, targets, labels, temperature=temperature, alpha=alpha, impl=impl, chunk_size=4
        )
        results.append((loss.detach(), *torch.autograd.grad(loss, (hidden, weight))))
    expected = kd_loss(hidden @ weight.T, targets, labels, temperature=temperature, alpha=alpha)
    torch.testing.assert_close(results[1][0], expected.detach())
    for fused, reference in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_a_confident_student_keeps_the_top_k_loss_and_gradient_finite_and_equal_to_the_reference(
    temperature: float,
) -> None:
    """Rows whose top K hold all but ~e^-60 of the student's mass (a student that memorised its blocks): fp32's
    1 - sum_K p is 0 there, which made the rest's log -inf and the loss and gradient inf and NaN. The fused
    path sums the rest directly, as the reference does."""
    from distill.kernels.kd_loss_linear import kd_loss_linear_topk
    from distill.losses.kd import kd_loss
    from distill.losses.topk import topk_targets

    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 5, 8), torch.randn(40, 8)
    teacher_logits = torch.randn(3, 5, 40) * 3
    targets = topk_targets(teacher_logits, 6, temperature)
    hidden[0] = 0.0
    weight = weight.clone()
    weight[targets.indices[0, 0, 0]] = 30.0  # row (0, *): one top-K class e^60 above the rest at T = 1
    hidden[0, :, :] = 1.0 / 8
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    labels = torch.randint(0, 40, (3, 5))
    results = []
    for impl in ("chunked", "reference"):
        loss = kd_loss_linear_topk(
            hidden, weight, targets, labels, temperature=temperature, alpha=0.3, impl=impl, chunk_size=4
        )
        results.append((loss.detach(), *torch.autograd.grad(loss, (hidden, weight))))
    expected = kd_loss(hidden @ weight.T, targets, labels, temperature=temperature, alpha=0.3)
    assert expected.isfinite()
    for fused, reference in zip(results[0], results[1], strict=True):
        assert fused.isfinite().all()  # the weight of 30 scales fp32's rounding in the gradients up
        torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("targets_kind", ["live", "topk"])
def test_under_bf16_autocast_the_heads_run_in_bf16_and_gradients_keep_fp32(targets_kind: str) -> None:
    """bf16-mixed training: the fused path follows autocast like the reference, within bf16's precision."""
    from distill.kernels.kd_loss_linear import kd_loss_linear_topk
    from distill.losses.topk import topk_targets

    student, teacher, labels = heads(rows=24, hidden=32, vocab=200)
    settings = dict(temperature=2.0, alpha=0.5)
    with torch.no_grad():
        targets = topk_targets(F.linear(*teacher), 16, 2.0)

    def loss_of(impl):
        if targets_kind == "live":
            return fused(student, teacher, labels, impl, chunk_size=5, **settings)
        h_s, w_s, b_s = student
        return kd_loss_linear_topk(h_s, w_s, targets, labels, student_bias=b_s, impl=impl, chunk_size=5, **settings)

    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        expected, expected_grads = value_and_grads(lambda *_: loss_of("reference"), student)
        actual, grads = value_and_grads(lambda *_: loss_of("chunked"), student)
        raw_grads = torch.autograd.grad(loss_of("chunked"), [tensor for tensor in student if tensor is not None])
    with torch.no_grad():
        full_precision = loss_of("chunked")
    assert all(grad.dtype == torch.float32 for grad in raw_grads)
    assert torch.allclose(actual, expected, rtol=1e-4)
    assert_close_grads(grads, expected_grads, 1e-2)
    assert 0 < (actual - full_precision).abs() < 0.05 * full_precision  # bf16 logits: close, not equal
