"""Every divergence of distill.losses.divergences against float64 formulas, through kd_loss and top-K targets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses.divergences import DIVERGENCES, divergence
from distill.losses.kd import KDLoss, kd_loss, kd_loss_terms
from distill.losses.topk import topk_targets

# (member, beta): every member, and the weighted ones at several weights.
CASES = [
    ("forward_kl", 0.5),
    ("reverse_kl", 0.5),
    ("jsd", 0.1),
    ("jsd", 0.5),
    ("jsd", 0.9),
    ("skew_kl", 0.1),
    ("skew_kl", 0.5),
    ("skew_rkl", 0.1),
    ("skew_rkl", 0.9),
    ("tvd", 0.5),
]
CASE_IDS = [f"{name}-{beta}" for name, beta in CASES]


def probabilities(logits: Tensor, temperature: float) -> Tensor:
    """float64 softmax written out, so that the reference shares no code with the implementation."""
    scaled = logits.double() / temperature
    weights = (scaled - scaled.amax(-1, keepdim=True)).exp()
    return weights / weights.sum(-1, keepdim=True)


def kl(a: Tensor, b: Tensor) -> Tensor:
    return (a * (a / b).log()).sum(-1)


def reference(p: Tensor, q: Tensor, name: str, beta: float) -> Tensor:
    """Per-row divergence between teacher q and student p, straight from the textbook formulas."""
    if name == "forward_kl":
        return kl(q, p)
    if name == "reverse_kl":
        return kl(p, q)
    if name == "jsd":
        m = beta * q + (1 - beta) * p
        return (beta * kl(q, m) + (1 - beta) * kl(p, m)) / (beta * (1 - beta))
    if name == "skew_kl":
        return kl(q, beta * q + (1 - beta) * p)
    if name == "skew_rkl":
        return kl(p, beta * p + (1 - beta) * q)
    assert name == "tvd"
    return 0.5 * (p - q).abs().sum(-1)


def random_logits(shape: tuple[int, ...], seed: int, scale: float = 3.0) -> Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    return F.log_softmax(logits.float() / temperature, dim=-1)


def labels_with_ignored(batch_shape: tuple[int, ...], classes: int, seed: int) -> Tensor:
    labels = torch.randint(0, classes, batch_shape, generator=torch.Generator().manual_seed(seed))
    labels.view(-1)[::3] = -100
    return labels


@pytest.mark.parametrize("shape", [(4, 7), (2, 3, 11)], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize(("name", "beta"), CASES, ids=CASE_IDS)
def test_values_match_float64_formulas(name: str, beta: float, temperature: float, shape: tuple[int, ...]) -> None:
    student, teacher = random_logits(shape, seed=1), random_logits(shape, seed=2)
    got = divergence(log_probs(student, temperature), log_probs(teacher, temperature), name, beta)
    expected = reference(probabilities(student, temperature), probabilities(teacher, temperature), name, beta)
    assert got.shape == shape[:-1] and got.dtype == torch.float32
    assert torch.allclose(got.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(4, 7), (2, 3, 11)], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize(("name", "beta"), CASES, ids=CASE_IDS)
def test_kd_loss_value_and_gradient_match_float64(name: str, beta: float, temperature: float, shape) -> None:
    student, teacher = random_logits(shape, seed=3), random_logits(shape, seed=4)
    labels = labels_with_ignored(shape[:-1], shape[-1], seed=5)
    counted = labels != -100
    student32, student64 = student.clone().requires_grad_(), student.double().requires_grad_()
    loss = kd_loss(student32, teacher, labels, temperature=temperature, alpha=0.0, divergence=name, beta=beta)
    per_row = reference(probabilities(student64, temperature), probabilities(teacher, temperature), name, beta)
    expected = temperature**2 * per_row[counted].mean()
    (grad,) = torch.autograd.grad(loss, student32)
    (expected_grad,) = torch.autograd.grad(expected, student64)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-6)
    assert torch.allclose(grad.double(), expected_grad, rtol=1e-5, atol=1e-5 * expected_grad.abs().max().item())


@pytest.mark.parametrize(("name", "beta"), CASES, ids=CASE_IDS)
def test_ignored_rows_never_count(name: str, beta: float) -> None:
    student, teacher = random_logits((6, 5), seed=6), random_logits((6, 5), seed=7)
    labels = torch.tensor([0, -100, 2, -100, 4, 1])
    settings = {"temperature": 2.0, "alpha": 0.5, "divergence": name, "beta": beta}
    changed_student, changed_teacher = student.clone(), teacher.clone()
    changed_student[[1, 3]] *= 40
    changed_teacher[[1, 3]] *= -40
    changed_student.requires_grad_()
    loss = kd_loss(changed_student, changed_teacher, labels, **settings)
    kept = labels != -100
    only_kept = kd_loss(student[kept], teacher[kept], labels[kept], **settings)
    assert loss.item() == pytest.approx(only_kept.item(), rel=1e-6)
    (grad,) = torch.autograd.grad(loss, changed_student)
    assert torch.count_nonzero(grad[[1, 3]]) == 0


@pytest.mark.parametrize(("name", "beta"), CASES, ids=CASE_IDS)
def test_soft_term_is_t_squared_times_mean_divergence(name: str, beta: float) -> None:
    student, teacher, temperature = random_logits((5, 9), seed=8), random_logits((5, 9), seed=9), 3.0
    terms = kd_loss_terms(student, teacher, None, temperature=temperature, alpha=0.0, divergence=name, beta=beta)
    per_row = divergence(log_probs(student, temperature), log_probs(teacher, temperature), name, beta)
    assert terms.kd.item() == pytest.approx(9.0 * per_row.mean().item(), rel=1e-6)
    assert terms.loss.item() == pytest.approx(terms.kd.item(), rel=1e-6)


def test_default_is_the_forward_kl_of_before() -> None:
    student, teacher, labels = random_logits((6, 8), seed=10), random_logits((6, 8), seed=11), torch.arange(6)
    default = kd_loss(student, teacher, labels, temperature=2.0, alpha=0.3)
    explicit = kd_loss(student, teacher, labels, temperature=2.0, alpha=0.3, divergence="forward_kl", beta=0.9)
    assert torch.equal(default, explicit)
    log_p, log_q = log_probs(student, 2.0), log_probs(teacher, 2.0)
    q = log_q.exp()
    former_soft_kl = torch.where(q > 0, q * (log_q - log_p), 0.0).sum(-1)  # distill.losses.kd._soft_kl until now
    assert torch.equal(divergence(log_p, log_q, "forward_kl"), former_soft_kl)


@pytest.mark.parametrize(("name", "beta"), CASES, ids=CASE_IDS)
def test_identical_distributions_give_zero(name: str, beta: float) -> None:
    logits = random_logits((3, 4, 10), seed=12)
    assert divergence(log_probs(logits), log_probs(logits.clone()), name, beta).abs().max() < 1e-6
    loss = kd_loss(logits, logits.clone(), None, temperature=2.0, alpha=0.0, divergence=name, beta=beta)
    assert abs(loss.item()) < 1e-6


@pytest.mark.parametrize(("name", "beta"), CASES, ids=CASE_IDS)
def test_classes_both_rule_out_contribute_exactly_nothing(name: str, beta: float) -> None:
    student, teacher = random_logits((4, 6), seed=13), random_logits((4, 6), seed=14)
    student[:, 2], teacher[:, 2] = float("-inf"), float("-inf")
    student.requires_grad_()
    got = divergence(log_probs(student), log_probs(teacher), name, beta)
    kept = [0, 1, 3, 4, 5]
    without = divergence(log_probs(student[:, kept]), log_probs(teacher[:, kept]), name, beta)
    assert torch.allclose(got, without, atol=1e-6)
    (grad,) = torch.autograd.grad(got.sum(), student)
    assert torch.isfinite(grad).all() and torch.count_nonzero(grad[:, 2]) == 0


@pytest.mark.parametrize(("name", "beta"), CASES, ids=CASE_IDS)
def test_teacher_ruling_out_a_class_keeps_every_bounded_member_finite(name: str, beta: float) -> None:
    teacher = torch.tensor([[2.0, float("-inf"), 0.0]])
    student = torch.tensor([[1.0, 3.0, 0.5]], requires_grad=True)
    got = divergence(log_probs(student), log_probs(teacher), name, beta)
    (grad,) = torch.autograd.grad(got.sum(), student)
    if name == "reverse_kl":  # the student puts mass where q = 0: KL(p || q) is infinite
        assert got.item() == math.inf
    else:
        assert torch.isfinite(got).all() and torch.isfinite(grad).all()


def test_jsd_endpoints_are_exactly_the_two_kls() -> None:
    log_p, log_q = log_probs(random_logits((8, 13), seed=15)), log_probs(random_logits((8, 13), seed=16))
    assert torch.equal(divergence(log_p, log_q, "jsd", 0.0), divergence(log_p, log_q, "forward_kl"))
    assert torch.equal(divergence(log_p, log_q, "jsd", 1.0), divergence(log_p, log_q, "reverse_kl"))
    assert torch.equal(divergence(log_p, log_q, "skew_kl", 0.0), divergence(log_p, log_q, "forward_kl"))
    assert torch.equal(divergence(log_p, log_q, "skew_rkl", 0.0), divergence(log_p, log_q, "reverse_kl"))


NEAR_ENDS = [(name, beta) for name in ("jsd", "skew_kl", "skew_rkl") for beta in (1e-6, 1e-3, 1 - 1e-3, 1 - 1e-6)]


@pytest.mark.parametrize(("name", "beta"), NEAR_ENDS, ids=[f"{name}-{beta}" for name, beta in NEAR_ENDS])
def test_weighted_members_stay_accurate_near_their_ends(name: str, beta: float) -> None:
    """Dividing by beta (1 - beta) near 0 must not amplify fp32 rounding: value and gradient vs float64."""
    student, teacher = random_logits((8, 13), seed=17), random_logits((8, 13), seed=18)
    student32, student64 = student.clone().requires_grad_(), student.double().requires_grad_()
    got = divergence(log_probs(student32), log_probs(teacher), name, beta)
    expected = reference(probabilities(student64, 1.0), probabilities(teacher, 1.0), name, beta)
    assert torch.allclose(got.double(), expected, rtol=1e-6, atol=2e-6)
    (grad,) = torch.autograd.grad(got.sum(), student32)
    (expected_grad,) = torch.autograd.grad(expected.sum(), student64)
    assert torch.allclose(grad.double(), expected_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "beta", "limit"),
    [
        ("jsd", 1e-6, "forward_kl"),
        ("jsd", 1 - 1e-6, "reverse_kl"),
        ("skew_kl", 1e-6, "forward_kl"),
        ("skew_rkl", 1e-6, "reverse_kl"),
        ("skew_kl", 1 - 1e-6, None),
        ("skew_rkl", 1 - 1e-6, None),
    ],
)
def test_weighted_members_are_continuous_at_their_ends(name: str, beta: float, limit: str | None) -> None:
    """Near an end value and gradient are those at the end (0 for the skew members as beta -> 1).

    The gap is about ``beta * chi2``, so logits of scale 1 keep it below the tolerance.
    """
    student = random_logits((8, 13), seed=17, scale=1.0).requires_grad_()
    log_q = log_probs(random_logits((8, 13), seed=18, scale=1.0))
    near = divergence(log_probs(student), log_q, name, beta)
    at_end = divergence(log_probs(student), log_q, limit) if limit else torch.zeros_like(near)
    assert torch.allclose(near, at_end, atol=2e-5)
    (grad_near,) = torch.autograd.grad(near.sum(), student)
    grad_end = torch.autograd.grad(at_end.sum(), student)[0] if limit else torch.zeros_like(grad_near)
    assert torch.allclose(grad_near, grad_end, atol=2e-5)


@pytest.mark.parametrize("rest", [True, False])
@pytest.mark.parametrize(("name", "beta"), CASES, ids=CASE_IDS)
def test_top_k_with_every_class_kept_is_the_full_logit_value(name: str, beta: float, rest: bool) -> None:
    student, teacher = random_logits((3, 4, 20), seed=19), random_logits((3, 4, 20), seed=20)
    labels = labels_with_ignored((3, 4), 20, seed=21)
    targets = topk_targets(teacher, k=20, temperature=2.0)._replace(rest=rest)
    settings = {"temperature": 2.0, "alpha": 0.0, "divergence": name, "beta": beta}
    student_full, student_topk = student.clone().requires_grad_(), student.clone().requires_grad_()
    full = kd_loss(student_full, teacher, labels, **settings)
    from_topk = kd_loss(student_topk, targets, labels, **settings)
    assert torch.allclose(from_topk, full, atol=1e-5)
    (grad_full,) = torch.autograd.grad(full, student_full)
    (grad_topk,) = torch.autograd.grad(from_topk, student_topk)
    assert torch.allclose(grad_topk, grad_full, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("name", "beta"), CASES, ids=CASE_IDS)
def test_half_precision_inputs_are_upcast(name: str, beta: float, dtype: torch.dtype) -> None:
    student, teacher = random_logits((4, 6), seed=22).to(dtype), random_logits((4, 6), seed=23).to(dtype)
    labels = torch.tensor([0, 1, -100, 5])
    settings = {"temperature": 2.0, "alpha": 0.5, "divergence": name, "beta": beta}
    got = kd_loss(student, teacher, labels, **settings)
    assert got.dtype == torch.float32
    assert torch.equal(got, kd_loss(student.float(), teacher.float(), labels, **settings))
    per_row = divergence(F.log_softmax(student, -1), F.log_softmax(teacher, -1), name, beta)
    assert per_row.dtype == torch.float32


def test_normalizer_divides_the_sums_instead_of_the_local_count() -> None:
    student, teacher = random_logits((2, 5, 9), seed=24), random_logits((2, 5, 9), seed=25)
    labels = labels_with_ignored((2, 5), 9, seed=26)
    counted = labels != -100
    settings = {"temperature": 2.0, "alpha": 0.4, "divergence": "jsd", "beta": 0.3}
    local = kd_loss_terms(student, teacher, labels, **settings)
    for normalizer in (37.0, torch.tensor(37)):
        step = kd_loss_terms(student, teacher, labels, **settings, normalizer=normalizer)
        scale = counted.sum().item() / 37.0  # local mean * count / normalizer = sum / normalizer
        assert step.ce.item() == pytest.approx(local.ce.item() * scale, rel=1e-6)
        assert step.kd.item() == pytest.approx(local.kd.item() * scale, rel=1e-6)
        assert step.loss.item() == pytest.approx(0.4 * step.ce.item() + 0.6 * step.kd.item(), rel=1e-6)
    ce_sum = F.cross_entropy(student[counted], labels[counted], reduction="sum")
    assert kd_loss(student, None, labels, temperature=1.0, alpha=1.0, normalizer=37).item() == pytest.approx(
        ce_sum.item() / 37, rel=1e-6
    )
    all_ignored = torch.full((2, 5), -100)
    assert kd_loss(student, teacher, all_ignored, **settings, normalizer=0).item() == 0.0


def test_kd_loss_module_carries_divergence_and_beta() -> None:
    student, teacher, labels = random_logits((5, 4), seed=27), random_logits((5, 4), seed=28), torch.arange(5) % 4
    module = KDLoss(temperature=2.0, alpha=0.25, divergence="skew_rkl", beta=0.2)
    expected = kd_loss_terms(student, teacher, labels, temperature=2.0, alpha=0.25, divergence="skew_rkl", beta=0.2)
    assert torch.equal(module(student, teacher, labels).loss, expected.loss)
    assert torch.equal(module(student, teacher, labels, normalizer=20).kd, expected.kd * 5 / 20)
    assert "divergence='skew_rkl', beta=0.2" in repr(module)


def test_members_are_listed() -> None:
    assert DIVERGENCES == ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_rkl", "tvd")


def test_unknown_divergence_is_named_with_the_valid_ones() -> None:
    message = r"divergence='kl' is not one of forward_kl, reverse_kl, jsd, skew_kl, skew_rkl, tvd"
    log_p = log_probs(torch.randn(2, 3))
    with pytest.raises(ValueError, match=message):
        divergence(log_p, log_p, "kl")
    with pytest.raises(ValueError, match=message):
        kd_loss(torch.randn(2, 3), torch.randn(2, 3), None, temperature=1.0, alpha=0.0, divergence="kl")
    with pytest.raises(ValueError, match=message):
        KDLoss(temperature=1.0, alpha=0.0, divergence="kl")


@pytest.mark.parametrize(
    ("name", "beta", "message"),
    [
        ("jsd", 1.5, r"beta=1.5 must be in \[0, 1\]"),
        ("jsd", -0.1, r"beta=-0.1 must be in \[0, 1\]"),
        ("tvd", float("nan"), r"beta=nan must be in \[0, 1\]"),
        ("skew_kl", 1.0, r"beta=1.0 must be in \[0, 1\) for divergence='skew_kl'"),
        ("skew_rkl", 1.0, r"beta=1.0 must be in \[0, 1\) for divergence='skew_rkl'"),
    ],
)
def test_bad_beta_is_named(name: str, beta: float, message: str) -> None:
    log_p = log_probs(torch.randn(2, 3))
    with pytest.raises(ValueError, match=message):
        divergence(log_p, log_p, name, beta)
    with pytest.raises(ValueError, match=message):
        KDLoss(temperature=1.0, alpha=0.0, divergence=name, beta=beta)


def test_negative_normalizer_is_named() -> None:
    with pytest.raises(ValueError, match=r"normalizer=-4.0 must be a count >= 0"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 3), None, temperature=1.0, alpha=0.0, normalizer=-4.0)
