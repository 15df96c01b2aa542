"""One-shot solvers (distill/pruning/oneshot/solvers.py): exact targets, SparseGPT against a float64
implementation written here, the reconstruction ordering of the three methods, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from distill.kernels.sparsity import is_nm_sparse
from distill.pruning.oneshot.solvers import SparsityTarget, magnitude, sparsegpt, wanda

TARGETS = [SparsityTarget(sparsity=0.5), SparsityTarget(n=2, m=4), SparsityTarget(n=4, m=8)]


def layer(rows: int = 24, columns: int = 64, tokens: int = 512, seed: int = 0):
    """A weight and correlated calibration inputs with uneven channel scales, as real activations have."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator, dtype=torch.float64)
    mixing = torch.randn(columns, columns, generator=generator, dtype=torch.float64) / math.sqrt(columns)
    scales = torch.rand(columns, generator=generator, dtype=torch.float64) * 4 + 0.1
    x = (
        torch.randn(tokens, columns, generator=generator, dtype=torch.float64) @ (mixing + torch.eye(columns))
    ) * scales
    return weight, x


def hessian(x: torch.Tensor) -> torch.Tensor:
    return 2.0 / x.shape[0] * x.t() @ x


def reference_sparsegpt(weight, h, target: SparsityTarget, block_size: int, damp: float):
    """The published algorithm without lazy batching: each column's error is applied to every later
    column at once, through the rows of the upper Cholesky factor of the dampened inverse Hessian."""
    w = weight.clone().double()
    rows, columns = w.shape
    h = h.clone().double()
    h += damp * h.diagonal().mean() * torch.eye(columns, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    keep = torch.ones_like(w, dtype=torch.bool)
    pruned_so_far = 0
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        if not target.structured:
            quota = math.floor(target.sparsity * rows * end) - pruned_so_far
            scores = (w[:, start:end] ** 2 / u.diagonal()[start:end] ** 2).flatten()
            block_keep = torch.ones_like(scores, dtype=torch.bool)
            block_keep[scores.argsort(stable=True)[:quota]] = False
            keep[:, start:end] = block_keep.reshape(rows, end - start)
            pruned_so_far += quota
        for j in range(start, end):
            if target.structured and (j - start) % target.m == 0:
                scores = w[:, j : j + target.m] ** 2 / u.diagonal()[j : j + target.m] ** 2
                group_keep = torch.zeros_like(scores, dtype=torch.bool)
                group_keep.scatter_(1, scores.topk(target.n, dim=1).indices, True)
                keep[:, j : j + target.m] = group_keep
            error = w[:, j] * ~keep[:, j] / u[j, j]
            w[:, j:] -= error[:, None] * u[j, j:][None, :]
            w[:, j] *= keep[:, j]
    return w, keep


@pytest.mark.parametrize("target", [*TARGETS, SparsityTarget(sparsity=0.3)], ids=str)
@pytest.mark.parametrize("block_size", [16, 40])
def test_sparsegpt_matches_a_float64_implementation_of_the_algorithm(target: SparsityTarget, block_size: int) -> None:
    if target.structured and block_size % target.m:
        pytest.skip("N:M groups must not straddle blocks")
    weight, x = layer()
    expected, expected_keep = reference_sparsegpt(weight, hessian(x), target, block_size, damp=0.01)
    actual, keep = sparsegpt(weight, target, hessian(x), block_size=block_size, damp=0.01)
    assert torch.equal(keep, expected_keep)
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)
    single, single_keep = sparsegpt(weight.float(), target, hessian(x).float(), block_size=block_size)
    assert (single_keep != keep).float().mean() < 0.01  # fp32: a rare near-tie flips
    assert single.dtype == torch.float32


@pytest.mark.parametrize("target", TARGETS, ids=str)
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(target: SparsityTarget) -> None:
    for seed in range(3):
        weight, x = layer(seed=seed)
        errors = {}
        for name, (pruned, _) in {
            "sparsegpt": sparsegpt(weight, target, hessian(x)),
            "wanda": wanda(weight, target, (x**2).sum(0)),
            "magnitude": magnitude(weight, target),
        }.items():
            errors[name] = torch.linalg.norm(x @ weight.t() - x @ pruned.t()).item()
        assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], (seed, errors)


@pytest.mark.parametrize("target", [*TARGETS, SparsityTarget(sparsity=0.37), SparsityTarget(sparsity=0.0)], ids=str)
@pytest.mark.parametrize("shape", [(24, 64), (7, 40)])
def test_every_method_prunes_exactly_the_target(target: SparsityTarget, shape: tuple[int, int]) -> None:
    weight, x = layer(*shape)
    results = {
        "magnitude": magnitude(weight, target),
        "wanda": wanda(weight, target, (x**2).sum(0)),
        "sparsegpt": sparsegpt(weight, target, hessian(x), block_size=16),
    }
    for name, (pruned, keep) in results.items():
        assert int((~keep).sum()) == target.pruned_count(weight.numel()), name
        assert not pruned[~keep].any(), name
        if target.structured:
            assert (keep.reshape(shape[0], -1, target.m).sum(-1) == target.n).all(), name
            assert is_nm_sparse(pruned, target.n, target.m), name


def test_wanda_ranks_within_each_row_by_weight_times_input_norm() -> None:
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    norms = torch.tensor([16.0, 1.0, 1.0, 0.01])  # |w| * sqrt(norm): row 0 -> 4, 2, 3, 0.4
    pruned, keep = wanda(weight, SparsityTarget(sparsity=0.5), norms)
    assert keep.tolist() == [[True, False, True, False], [True, True, False, False]]
    assert torch.equal(pruned, weight * keep)


def test_dead_inputs_fall_back_to_magnitude_and_receive_no_compensation() -> None:
    weight, x = layer()
    x[:, [3, 10]] = 0.0  # inputs no calibration token uses: H is singular
    pruned, keep = sparsegpt(weight, SparsityTarget(n=2, m=4), hessian(x))
    assert torch.isfinite(pruned).all() and is_nm_sparse(pruned)
    kept_dead = keep[:, [3, 10]]
    # Nothing flows into a dead column (its Hessian row is zero): kept entries keep their weight.
    torch.testing.assert_close(pruned[:, [3, 10]][kept_dead], weight[:, [3, 10]][kept_dead])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"sparsity": 1.0}, r"sparsity=1.0 must be a number in \[0, 1\)"),
        ({"sparsity": -0.1}, "sparsity=-0.1"),
        ({"pattern": "4:2"}, "pattern='4:2' must be 'N:M'"),
        ({"pattern": "2-4"}, "pattern='2-4'"),
        ({"sparsity": 0.5, "pattern": "2:4"}, "are both set: give one"),
        ({}, "set one of them"),
    ],
)
def test_bad_targets_are_named(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SparsityTarget.parse(**arguments)


def test_a_pattern_that_does_not_divide_the_input_width_is_named() -> None:
    weight, x = layer(columns=30)
    target = SparsityTarget.parse(pattern="4:8")
    for prune in (lambda: magnitude(weight, target), lambda: sparsegpt(weight, target, hessian(x), name="fc1")):
        with pytest.raises(ValueError, match=r"pattern 4:8 needs .*input width \(30\) to be a multiple of 8"):
            prune()


def test_a_hessian_that_no_dampening_fixes_names_the_layer() -> None:
    weight, _ = layer(columns=8)
    with pytest.raises(ValueError, match=r"layers\.3\.mlp\.down_proj: the input Hessian is not positive definite"):
        sparsegpt(
            weight, SparsityTarget(sparsity=0.5), -torch.eye(8, dtype=torch.float64), name="layers.3.mlp.down_proj"
        )


def test_n_m_ties_keep_the_first_columns_whatever_the_order_of_the_group() -> None:
    """Quantized weights tie often: the kept pair must not depend on the device's topk."""
    weight = torch.tensor([[0.5, -0.5, 0.5, 0.1, 0.2, -0.3, 0.3, 0.3]])
    _, keep = magnitude(weight, SparsityTarget.parse(None, "2:4"))
    assert keep.tolist() == [[True, True, False, False, False, True, True, False]]
