"""nm_mask: APEX ASP's m4n2_1d rule (pattern order, ties), dtypes, Conv layouts, errors."""

from __future__ import annotations

import pytest
import torch

from distill.kernels.sparsity import asp_patterns, is_nm_sparse, nm_mask

# The order ASP's argmax breaks ties in (notes/sparsity-qat.md, A.5), written out by hand.
ASP_2_4_ORDER = [(0, 1, 0, 1), (1, 1, 0, 0), (0, 1, 1, 0), (1, 0, 1, 0), (1, 0, 0, 1), (0, 0, 1, 1)]


def asp_reference(matrix: torch.Tensor) -> torch.Tensor:
    """ASP's m4n2_1d written as a loop: best pattern per group of 4, first one on ties."""
    mask = torch.zeros(matrix.shape, dtype=torch.bool)
    magnitudes = matrix.float().abs()
    for row in range(matrix.shape[0]):
        for start in range(0, matrix.shape[1], 4):
            group = magnitudes[row, start : start + 4].tolist()
            scores = [sum(g * p for g, p in zip(group, pattern, strict=True)) for pattern in ASP_2_4_ORDER]
            best = ASP_2_4_ORDER[scores.index(max(scores))]
            mask[row, start : start + 4] = torch.tensor(best, dtype=torch.bool)
    return mask


def test_pattern_order_is_asps() -> None:
    assert list(asp_patterns(2, 4)) == ASP_2_4_ORDER


@pytest.mark.parametrize(
    ("group", "kept"),
    [
        ([0.0, 0.0, 0.0, 0.0], [False, True, False, True]),  # all zero: ASP's first pattern
        ([1.0, 1.0, 1.0, 1.0], [False, True, False, True]),  # all equal
        ([3.0, 1.0, 1.0, 0.5], [True, True, False, False]),  # tie for second place: (1,1,0,0) comes first
        ([0.5, 1.0, 1.0, 3.0], [False, True, False, True]),  # tie for second place: (0,1,0,1) comes first
        ([-4.0, 0.1, 3.0, -0.2], [True, False, True, False]),  # magnitudes, not signed values
    ],
)
def test_hand_made_ties(group: list[float], kept: list[bool]) -> None:
    assert nm_mask(torch.tensor([group])).tolist() == [kept]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_asp_reference_in_every_dtype(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    # Few distinct values make ties frequent, which is where a plain top-2 and ASP differ.
    weight = torch.randint(-3, 4, (16, 32)).to(dtype) * 0.25
    mask = nm_mask(weight)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, asp_reference(weight))
    assert torch.equal(mask.reshape(-1, 4).sum(-1), torch.full((16 * 8,), 2))


def test_equals_top2_except_on_ties() -> None:
    torch.manual_seed(1)
    weight = torch.randn(64, 128)
    groups = weight.abs().reshape(-1, 4)
    top2 = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(2, dim=-1).indices, True)
    sorted_groups = groups.sort(dim=-1, descending=True).values
    tied = sorted_groups[:, 1] == sorted_groups[:, 2]
    mask = nm_mask(weight).reshape(-1, 4)
    assert torch.equal(mask[~tied], top2[~tied])
    zeroed = nm_mask(torch.zeros(4, 8)).reshape(-1, 4)
    assert not torch.equal(zeroed, zeroed.new_tensor([[True, True, False, False]] * 8))


def test_conv2d_groups_input_channels_at_each_kernel_position() -> None:
    torch.manual_seed(2)
    weight = torch.randn(8, 16, 3, 3)
    mask = nm_mask(weight)
    assert mask.shape == weight.shape
    as_matrix = weight.permute(2, 3, 0, 1).reshape(-1, 16)
    expected = asp_reference(as_matrix).reshape(3, 3, 8, 16).permute(2, 3, 0, 1)
    assert torch.equal(mask, expected)
    for k in range(8):
        for r in range(3):
            for s in range(3):
                assert mask[k, :, r, s].reshape(-1, 4).sum(-1).tolist() == [2, 2, 2, 2]


def test_conv1d_groups_input_channels() -> None:
    weight = torch.randn(8, 16, 5)
    mask = nm_mask(weight)
    expected = asp_reference(weight.permute(0, 2, 1).reshape(-1, 16)).reshape(8, 5, 16).permute(0, 2, 1)
    assert torch.equal(mask, expected)


@pytest.mark.parametrize(("n", "m"), [(1, 4), (2, 8), (4, 8), (3, 16)])
def test_general_n_m_keeps_the_largest(n: int, m: int) -> None:
    torch.manual_seed(3)
    weight = torch.randn(8, 4 * m)
    mask = nm_mask(weight, n=n, m=m)
    assert torch.equal(mask.reshape(-1, m).sum(-1), torch.full((8 * 4,), n))
    kept_min = weight.abs().reshape(-1, m).masked_fill(~mask.reshape(-1, m), float("inf")).min(-1).values
    dropped_max = weight.abs().reshape(-1, m).masked_fill(mask.reshape(-1, m), -1.0).max(-1).values
    assert bool((kept_min >= dropped_max).all())
    assert is_nm_sparse(weight * mask, n=n, m=m)


def test_is_nm_sparse() -> None:
    assert is_nm_sparse(torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 5.0]]))
    assert not is_nm_sparse(torch.tensor([[1.0, 1.0, 2.0, 0.0]]))
    assert not is_nm_sparse(torch.zeros(2, 6))  # 6 input channels cannot be cut into groups of 4


@pytest.mark.parametrize(("n", "m", "message"), [(4, 4, "N=4, M=4"), (0, 4, "N=0"), (2, 1, "M=1")])
def test_invalid_n_m_is_named(n: int, m: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        nm_mask(torch.randn(4, 8), n=n, m=m)


def test_input_dim_not_a_multiple_of_m_is_named() -> None:
    with pytest.raises(ValueError, match=r"multiple of 4; weight \(4, 6\)"):
        nm_mask(torch.randn(4, 6))
