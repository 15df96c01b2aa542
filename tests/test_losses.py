"""kd_loss against an independent float64 computation, the T^2 rule and bad arguments."""

from __future__ import annotations

import math

import pytest
import torch

from distill.losses.kd import KDLoss, kd_loss, kd_loss_terms


def reference_loss(student, teacher, labels, temperature, alpha, ignore_index=-100) -> float:
    """Loop over examples in float64, written without the code under test."""
    ce_terms, kl_terms = [], []
    for s_row, t_row, label in zip(student.tolist(), teacher.tolist(), labels.tolist(), strict=True):
        if label == ignore_index:
            continue
        s_max = max(s_row)
        log_z_s = s_max + math.log(sum(math.exp(v - s_max) for v in s_row))
        ce_terms.append(log_z_s - s_row[label])
        s_scaled = [v / temperature for v in s_row]
        t_scaled = [v / temperature for v in t_row]
        log_zs = max(s_scaled) + math.log(sum(math.exp(v - max(s_scaled)) for v in s_scaled))
        log_zt = max(t_scaled) + math.log(sum(math.exp(v - max(t_scaled)) for v in t_scaled))
        kl = 0.0
        for sv, tv in zip(s_scaled, t_scaled, strict=True):
            log_pt, log_ps = tv - log_zt, sv - log_zs
            kl += math.exp(log_pt) * (log_pt - log_ps)
        kl_terms.append(kl)
    ce = sum(ce_terms) / len(ce_terms)
    kl = sum(kl_terms) / len(kl_terms)
    return alpha * ce + (1 - alpha) * temperature**2 * kl


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 8.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_matches_independent_computation_with_ignored_examples(temperature: float, alpha: float) -> None:
    generator = torch.Generator().manual_seed(int(temperature * 10 + alpha * 100))
    student = torch.randn(12, 5, generator=generator) * 3
    teacher = torch.randn(12, 5, generator=generator) * 3
    labels = torch.randint(0, 5, (12,), generator=generator)
    labels[[1, 4, 7]] = -100
    got = kd_loss(student, teacher, labels, temperature=temperature, alpha=alpha)
    expected = reference_loss(student, teacher, labels, temperature, alpha)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_ignored_examples_do_not_change_the_loss() -> None:
    student, teacher = torch.randn(6, 3), torch.randn(6, 3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    masked = labels.clone()
    masked[3:] = -100
    full_of_first_half = kd_loss(student[:3], teacher[:3], labels[:3], temperature=2.0, alpha=0.5)
    changed_teacher = teacher.clone()
    changed_teacher[3:] *= 50
    with_ignored = kd_loss(student, changed_teacher, masked, temperature=2.0, alpha=0.5)
    # Rows 3..5 differ wildly in the teacher but are ignored.
    assert torch.allclose(with_ignored, kd_loss(student, teacher, masked, temperature=2.0, alpha=0.5))
    assert with_ignored.item() == pytest.approx(full_of_first_half.item(), rel=1e-6)


def test_terms_add_up_and_are_unweighted() -> None:
    student, teacher, labels = torch.randn(8, 4), torch.randn(8, 4), torch.randint(0, 4, (8,))
    terms = kd_loss_terms(student, teacher, labels, temperature=3.0, alpha=0.3)
    assert terms.loss.item() == pytest.approx(0.3 * terms.ce.item() + 0.7 * terms.kd.item(), rel=1e-6)
    only_ce = kd_loss(student, teacher, labels, temperature=3.0, alpha=1.0)
    assert only_ce.item() == pytest.approx(torch.nn.functional.cross_entropy(student, labels).item(), rel=1e-6)


def kd_gradient_norm(temperature: float) -> float:
    student = torch.randn(64, 10, generator=torch.Generator().manual_seed(0)).requires_grad_()
    teacher = torch.randn(64, 10, generator=torch.Generator().manual_seed(1))
    kd_loss(student, teacher, temperature=temperature, alpha=0.0).backward()
    return student.grad.norm().item()


def test_t_squared_keeps_gradient_scale() -> None:
    # Soft-target gradients shrink like 1/T^2 as T grows; the T^2 factor must cancel that.
    ratio = kd_gradient_norm(8.0) / kd_gradient_norm(4.0)
    assert 0.8 < ratio < 1.25, f"gradient ratio T=8/T=4 is {ratio:.3f}; 1/T^2 scaling would give 0.25"


def test_half_precision_inputs_are_upcast() -> None:
    student = torch.randn(4, 3, dtype=torch.float16) * 4
    teacher = torch.randn(4, 3, dtype=torch.float16) * 4
    labels = torch.tensor([0, 1, 2, 1])
    got = kd_loss(student, teacher, labels, temperature=2.0, alpha=0.5)
    assert got.dtype == torch.float32
    expected = reference_loss(student.float(), teacher.float(), labels, 2.0, 0.5)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_labels_none_is_pure_distillation() -> None:
    student, teacher = torch.randn(5, 3), torch.randn(5, 3)
    ignore_none = kd_loss(student, teacher, torch.zeros(5, dtype=torch.long), temperature=2.0, alpha=0.0)
    assert kd_loss(student, teacher, None, temperature=2.0, alpha=0.0).item() == pytest.approx(ignore_none.item())
    with pytest.raises(ValueError, match=r"labels=None requires alpha=0 \(got alpha=0.5\)"):
        kd_loss(student, teacher, None, temperature=2.0, alpha=0.5)


def test_soft_term_ignores_alpha_and_needs_no_labels() -> None:
    """KDLoss.soft is T^2 * KL over every row, whatever alpha the loss mixes its terms with."""
    student, teacher = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    every_row = torch.zeros(6, dtype=torch.long)
    expected = reference_loss(student, teacher, every_row, temperature=3.0, alpha=0.0)
    for alpha in (0.0, 0.5, 1.0):
        soft = KDLoss(temperature=3.0, alpha=alpha).soft(student.float(), teacher.float())
        assert soft.dtype == torch.float32 and soft.item() == pytest.approx(expected, rel=1e-5)


def test_identical_distributions_give_zero_kd() -> None:
    logits = torch.randn(7, 4)
    assert kd_loss(logits, logits.clone(), temperature=4.0, alpha=0.0).item() == pytest.approx(0.0, abs=1e-6)


def test_all_ignored_is_zero_with_a_graph() -> None:
    student = torch.randn(3, 2, requires_grad=True)
    loss = kd_loss(student, torch.randn(3, 2), torch.full((3,), -100), temperature=2.0, alpha=0.5)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(student.grad) == 0


def test_masked_teacher_classes_contribute_nothing() -> None:
    teacher = torch.tensor([[2.0, float("-inf"), 0.0]])
    student = torch.tensor([[1.0, 3.0, 0.5]], requires_grad=True)
    loss = kd_loss(student, teacher, temperature=1.0, alpha=0.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_rejects_non_positive_temperature(temperature: float) -> None:
    with pytest.raises(ValueError, match=f"temperature={temperature!r} must be > 0"):
        kd_loss(torch.randn(2, 2), torch.randn(2, 2), torch.tensor([0, 1]), temperature=temperature, alpha=0.5)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_rejects_alpha_outside_unit_interval(alpha: float) -> None:
    with pytest.raises(ValueError, match=rf"alpha={alpha!r} is outside \[0.0, 1.0\]"):
        KDLoss(temperature=2.0, alpha=alpha)


def test_teacher_logits_required_unless_alpha_is_one() -> None:
    with pytest.raises(ValueError, match="teacher_logits=None requires alpha=1"):
        kd_loss(torch.randn(2, 2), None, torch.tensor([0, 1]), temperature=1.0, alpha=0.5)
