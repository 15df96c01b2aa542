"""Large-vocabulary KD loss: chunked and Triton paths against the reference kd_loss.

Without a GPU the Triton kernel runs under Triton's interpreter (TRITON_INTERPRET=1, set by
conftest.py before anything imports triton); on a CUDA machine the same tests run it compiled.
"""

from __future__ import annotations

import pytest
import torch

from distill.kernels.kd_loss import fused_kd_loss, kd_loss_chunked, pick_impl, triton_available
from distill.losses.kd import kd_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def inputs(dtype=torch.float32, shape=(3, 7), vocab=300, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(*shape, vocab, generator=generator)).to(DEVICE, dtype).requires_grad_()
    teacher = (3 * torch.randn(*shape, vocab, generator=generator)).to(DEVICE, dtype)
    labels = torch.randint(0, vocab, shape, generator=generator).to(DEVICE)
    labels[0, ::3] = -100
    return student, teacher, labels


def value_and_grad(loss_fn, student, teacher, labels, **kwargs):
    loss = loss_fn(student, teacher, labels, **kwargs)
    (grad,) = torch.autograd.grad(loss, student)
    return loss.detach().float(), grad.float()


def implementations():
    chunked = pytest.param(lambda *a, **k: kd_loss_chunked(*a, chunk_size=4, **k), id="chunked")
    triton = pytest.param(lambda *a, **k: fused_kd_loss(*a, impl="triton", **k), id="triton", marks=needs_triton)
    return [chunked, triton]


@pytest.mark.parametrize("impl", implementations())
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 8.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_matches_the_reference_in_value_and_gradient(impl, temperature: float, alpha: float) -> None:
    student, teacher, labels = inputs()
    settings = dict(temperature=temperature, alpha=alpha)
    expected, expected_grad = value_and_grad(kd_loss, student, teacher, labels, **settings)
    actual, grad = value_and_grad(impl, student, teacher, labels, **settings)
    assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-6)
    assert (grad - expected_grad).abs().max() <= 1e-5 * expected_grad.abs().max()
    assert not grad[0, ::3].any()  # ignored rows get no gradient


@pytest.mark.parametrize("impl", implementations())
def test_bf16_inputs_accumulate_in_fp32(impl) -> None:
    student, teacher, labels = inputs(torch.bfloat16)
    expected, expected_grad = value_and_grad(kd_loss, student, teacher, labels, temperature=2.0, alpha=0.5)
    actual, grad = value_and_grad(impl, student, teacher, labels, temperature=2.0, alpha=0.5)
    assert torch.allclose(actual, expected, rtol=1e-5)
    assert (grad - expected_grad).abs().max() <= 1e-2 * expected_grad.abs().max()  # the gradient is stored in bf16


@pytest.mark.parametrize("impl", implementations())
def test_no_labels_and_teacher_masked_classes(impl) -> None:
    student, teacher, _ = inputs()
    teacher = teacher.clone()
    teacher[..., :50] = float("-inf")  # classes the teacher rules out contribute exactly 0
    expected, expected_grad = value_and_grad(kd_loss, student, teacher, None, temperature=4.0, alpha=0.0)
    actual, grad = value_and_grad(impl, student, teacher, None, temperature=4.0, alpha=0.0)
    assert torch.isfinite(actual) and torch.allclose(actual, expected, rtol=1e-5)
    assert (grad - expected_grad).abs().max() <= 1e-5 * expected_grad.abs().max()


def test_dispatcher_choice_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    student, _, _ = inputs()
    assert pick_impl(student) == ("triton" if student.is_cuda and triton_available() else "chunked")
    monkeypatch.setenv("DISTILL_KD_IMPL", "reference")
    assert pick_impl(student) == "reference" and pick_impl(student, "chunked") == "chunked"
    monkeypatch.setenv("DISTILL_KD_IMPL", "fast")
    with pytest.raises(ValueError, match=r"'fast' is not one of .* DISTILL_KD_IMPL"):
        pick_impl(student)


def test_contract_errors_are_the_reference_ones() -> None:
    student, teacher, labels = inputs()
    with pytest.raises(ValueError, match="labels=None requires alpha=0"):
        kd_loss_chunked(student, teacher, None, temperature=2.0, alpha=0.5)
    with pytest.raises(ValueError, match="temperature=0"):
        kd_loss_chunked(student, teacher, labels, temperature=0, alpha=0.5)


def test_backward_runs_once_per_forward() -> None:
    student, teacher, labels = inputs()
    loss = kd_loss_chunked(student, teacher, labels, temperature=2.0, alpha=0.5)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()


@needs_triton
@pytest.mark.parametrize("block_size", [64, 512])
def test_triton_rows_agree_across_vocabulary_blocks(block_size: int) -> None:
    """Blocks narrower than the vocabulary (the online softmax carried across blocks, a partial last
    block), with the teacher ruling out every class of the first block (no 0 * inf there)."""
    from distill.kernels.kd_loss_triton import kd_rows

    student, teacher, labels = inputs()
    teacher = teacher.clone()
    teacher[..., :100] = float("-inf")
    expected, expected_grad = value_and_grad(kd_loss, student, teacher, labels, temperature=2.0, alpha=0.5)
    rows, kept = labels.reshape(-1), int((labels != -100).sum())
    loss, grad = kd_rows(
        student.detach().reshape(-1, 300), teacher.reshape(-1, 300), rows, 2.0, 0.5, -100, 1 / kept, block_size, 2
    )
    assert torch.isfinite(loss) and torch.allclose(loss, expected, rtol=1e-5)
    assert (grad.view_as(expected_grad) - expected_grad).abs().max() <= 1e-5 * expected_grad.abs().max()
