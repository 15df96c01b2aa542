"""Top-K teacher targets: exact with K = V, the rest bucket, renormalisation, and their errors."""

from __future__ import annotations

import pytest
import torch

from distill.losses.kd import kd_loss, kd_loss_topk
from distill.losses.topk import MASS_ROWS, largest_logits, log1mexp, outside_log_mass, outside_log_masses, topk_targets


def logits(shape=(4, 6, 50), seed=0, scale=3.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rest", [True, False])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_all_classes_kept_is_the_full_loss(rest: bool, alpha: float) -> None:
    student, teacher = logits(seed=1).requires_grad_(), logits(seed=2)
    labels = torch.randint(0, 50, (4, 6))
    labels[1] = -100
    targets = topk_targets(teacher, k=50, temperature=2.0)
    full = kd_loss(student, teacher, labels, temperature=2.0, alpha=alpha)
    assert torch.allclose(kd_loss(student, targets, labels, temperature=2.0, alpha=alpha), full, atol=1e-5)
    assert torch.allclose(
        kd_loss_topk(student, targets, labels, temperature=2.0, alpha=alpha, rest=rest), full, atol=1e-5
    )


def test_rest_bucket_is_exact_when_the_teacher_has_no_mass_outside_its_top_k() -> None:
    student, teacher = logits(seed=3), logits(seed=4)
    teacher[..., 10:] = -1e4  # only 10 classes carry mass
    targets = topk_targets(teacher, k=10, temperature=1.0)
    full = kd_loss(student, teacher, None, temperature=1.0, alpha=0.0)
    assert torch.allclose(kd_loss_topk(student, targets, temperature=1.0, alpha=0.0), full, atol=1e-5)


def test_rest_bucket_against_an_explicit_k_plus_1_way_kl() -> None:
    student, teacher = logits((2, 30), seed=5), logits((2, 30), seed=6)
    k, temperature = 5, 2.0
    targets = topk_targets(teacher, k=k, temperature=temperature)
    q_full, p_full = (teacher / temperature).softmax(-1), (student / temperature).softmax(-1)
    q = torch.cat(
        [q_full.gather(-1, targets.indices), 1 - q_full.gather(-1, targets.indices).sum(-1, keepdim=True)], -1
    )
    p = torch.cat(
        [p_full.gather(-1, targets.indices), 1 - p_full.gather(-1, targets.indices).sum(-1, keepdim=True)], -1
    )
    expected = temperature**2 * (q * (q / p).log()).sum(-1).mean()
    loss = kd_loss_topk(student, targets, temperature=temperature, alpha=0.0)
    assert torch.allclose(loss, expected, atol=1e-5)
    renormalised = kd_loss_topk(student, targets, temperature=temperature, alpha=0.0, rest=False)
    q_k, p_k = q[..., :k] / q[..., :k].sum(-1, keepdim=True), p[..., :k] / p[..., :k].sum(-1, keepdim=True)
    assert torch.allclose(renormalised, temperature**2 * (q_k * (q_k / p_k).log()).sum(-1).mean(), atol=1e-5)


def test_targets_are_bound_to_their_temperature_and_k_is_checked() -> None:
    targets = topk_targets(logits(), k=5, temperature=2.0)
    with pytest.raises(ValueError, match=r"made at T=2.0, not T=4.0"):
        kd_loss_topk(logits(), targets, temperature=4.0, alpha=0.0)
    with pytest.raises(ValueError, match=r"k=51 must be in \[1, vocabulary size 50\]"):
        topk_targets(logits(), k=51, temperature=1.0)


def test_log1mexp_is_stable() -> None:
    x = torch.tensor([0.0, -1e-9, -0.5, -5.0, -50.0, float("-inf")])
    expected = torch.log(-torch.expm1(x.double())).float()
    assert torch.allclose(log1mexp(x)[1:], expected[1:], rtol=1e-5) and log1mexp(x)[0] == float("-inf")


def test_rest_masses_at_several_temperatures_equal_the_direct_sum_at_each() -> None:
    """The store's rest masses (rows through a cache-sized buffer, more rows than it holds and not a multiple of
    it) against the plain log-sum-exp at each temperature; a row whose outside mass is below fp32's smallest
    exponential (here exp(-10,000)) gets -inf."""
    torch.manual_seed(0)
    logits = torch.randn(3, MASS_ROWS + 5, 50) * 4
    logits[0, 0, 8:] = -1e4  # all of this row's mass, to fp32, lies in its 8 largest logits
    _, indices = largest_logits(logits, 8)
    masses = outside_log_masses(logits, indices, (1.0, 2.0, 0.5))
    for column, temperature in enumerate((1.0, 2.0, 0.5)):
        expected = outside_log_mass(logits / temperature, indices)
        torch.testing.assert_close(masses[..., column].flatten()[1:], expected.flatten()[1:], rtol=1e-5, atol=1e-5)
    assert (masses[0, 0] == float("-inf")).all() and masses.flatten(0, 1)[1:].isfinite().all()
