"""Hidden-state loss: masked fp32 MSE, layer maps, projections, and its errors."""

from __future__ import annotations

import pytest
import torch

from distill.losses.hidden import HiddenStateLoss, hidden_state_loss, uniform_layer_map


def states(seed: int, shape=(3, 5, 8)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_matches_an_independent_masked_mse() -> None:
    student, teacher = states(0), states(1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    expected = torch.cat([((student[b, :n] - teacher[b, :n]) ** 2).flatten() for b, n in enumerate([3, 5, 1])])
    assert torch.allclose(hidden_state_loss(student, teacher, mask), expected.mean(), atol=1e-6)


def test_padding_does_not_change_the_value() -> None:
    student, teacher = states(0, (1, 4, 8)), states(1, (1, 4, 8))
    padded_student = torch.cat([student, states(2, (1, 3, 8))], dim=1)
    padded_teacher = torch.cat([teacher, states(3, (1, 3, 8))], dim=1)
    mask = torch.tensor([[1] * 4 + [0] * 3])
    short = hidden_state_loss(student, teacher, torch.ones(1, 4))
    assert torch.allclose(hidden_state_loss(padded_student, padded_teacher, mask), short, atol=1e-6)


def test_computed_in_fp32_from_bf16_inputs() -> None:
    student, teacher = states(0).bfloat16(), states(1).bfloat16()
    mask = torch.ones(3, 5)
    loss = hidden_state_loss(student, teacher, mask)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, hidden_state_loss(student.float(), teacher.float(), mask))


def test_shape_mismatch_is_named() -> None:
    with pytest.raises(ValueError, match=r"\(3, 5, 8\) vs \(3, 5, 4\)"):
        hidden_state_loss(states(0), states(1, (3, 5, 4)), torch.ones(3, 5))


@pytest.mark.parametrize(("student", "teacher", "expected"), [(2, 6, [2, 5]), (3, 6, [1, 3, 5]), (4, 6, [1, 2, 4, 5])])
def test_uniform_layer_map_ends_on_the_last_layer(student: int, teacher: int, expected: list[int]) -> None:
    assert uniform_layer_map(student, teacher) == expected


def test_layer_pairs_are_averaged_and_the_embeddings_skipped() -> None:
    student_hidden = [states(9), states(0), states(1)]  # embeddings, layer 0, layer 1
    teacher_hidden = [states(8), states(2), states(3), states(4)]
    mask = torch.ones(3, 5)
    loss = HiddenStateLoss([2, 0], student_width=8, teacher_width=8, teacher_layers=3)
    expected = (hidden_state_loss(states(0), states(4), mask) + hidden_state_loss(states(1), states(2), mask)) / 2
    assert torch.allclose(loss(student_hidden, teacher_hidden, mask), expected)


def test_different_widths_get_a_trainable_projection() -> None:
    loss = HiddenStateLoss([0], student_width=4, teacher_width=8, teacher_layers=1)
    value = loss([states(0, (3, 5, 4))] * 2, [states(1)] * 2, torch.ones(3, 5))
    value.backward()
    assert loss.projections[0].weight.grad is not None


def test_a_teacher_layer_out_of_range_is_named() -> None:
    with pytest.raises(ValueError, match=r"hidden_layers=\[0, 6\] names teacher layers \[6\]; it has 6"):
        HiddenStateLoss([0, 6], student_width=8, teacher_width=8, teacher_layers=6)


def test_student_depth_mismatch_is_named() -> None:
    loss = HiddenStateLoss([0, 1], student_width=8, teacher_width=8, teacher_layers=2)
    with pytest.raises(ValueError, match=r"has 2 entries; the student has 1 layers"):
        loss([states(0)] * 2, [states(1)] * 3, torch.ones(3, 5))
