"""One-shot pruning of one Linear weight ``W`` (out x in) from statistics of its inputs.

A layer that stores its weight transposed (GPT-2's ``Conv1D``) is passed as its ``[out, in]`` view
(:func:`distill.architectures.linears.linear_weight`); the caller writes the result back through it.

Contract shared by the three methods: each returns ``(weight, keep)``, a new weight (same dtype)
whose pruned entries are exact zeros and the boolean mask (True = kept), and never modifies its
arguments.

- :class:`SparsityTarget`: ``sparsity`` (unstructured: exactly ``floor(sparsity * W.numel())``
  entries pruned, spread over the comparison groups so the total is exact) or N:M (``n`` kept in
  every group of ``m`` consecutive input channels, as the 2:4 kernels need).
- ``magnitude``: smallest ``|W|``, over the whole matrix.
- ``wanda`` (Sun et al. 2023): smallest ``|W_ij| * ||x_j||_2`` in each output row; no update.
- ``sparsegpt`` (Frantar & Alistarh 2023), as published: ``H = 2/n sum x x^T`` (fp32 or fp64),
  dampened by ``damp * mean(diag H)``, the upper Cholesky factor of ``H^-1``, columns processed in
  blocks of ``block_size`` with lazy updates; the mask of a block (unstructured) or of each group
  of ``m`` columns (N:M) chosen by ``w^2 / [H^-1]_jj^2`` from the weights as updated so far, and
  every pruned weight's error compensated on the columns to its right.

Inputs that are zero on every calibration token (``H_jj = 0``, "dead" inputs) make ``H`` singular:
their diagonal is set to 1, so their weights are ranked by magnitude and nothing is compensated
through them. If the dampened ``H`` is still not positive definite, the dampening is raised tenfold,
up to :data:`DAMP_RETRIES` times, and then the error names the layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

DAMP_RETRIES = 3


@dataclass(frozen=True)
class SparsityTarget:
    """Unstructured ``sparsity`` in [0, 1), or ``n`` kept of every ``m`` input channels."""

    sparsity: float | None = None
    n: int | None = None
    m: int | None = None

    @classmethod
    def parse(cls, sparsity: float | None = None, pattern: str | None = None) -> SparsityTarget:
        if sparsity is None and pattern is None:
            raise ValueError("sparsity=null and pattern=null: set one of them, e.g. sparsity=0.5 or pattern=2:4")
        if sparsity is not None and pattern is not None:  # a preset sets one, the command line the other
            raise ValueError(
                f"sparsity={sparsity!r} and pattern={pattern!r} are both set: give one, e.g. "
                f"sparsity={sparsity!r} pattern=null, or pattern={pattern} sparsity=null"
            )
        if pattern is not None:
            parts = str(pattern).split(":")
            if len(parts) != 2 or not all(part.isdigit() for part in parts) or not 0 < int(parts[0]) < int(parts[1]):
                raise ValueError(f"pattern={pattern!r} must be 'N:M' with integers 0 < N < M, e.g. '2:4'")
            return cls(n=int(parts[0]), m=int(parts[1]))
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
            raise ValueError(f"sparsity={sparsity!r} must be a number in [0, 1)")
        return cls(sparsity=float(sparsity))

    @property
    def structured(self) -> bool:
        return self.m is not None

    def check(self, weight: Tensor, name: str = "weight") -> None:
        if self.structured and weight.shape[1] % self.m:
            raise ValueError(
                f"pattern {self.n}:{self.m} needs {name}'s input width ({weight.shape[1]}) to be a multiple of "
                f"{self.m}: choose an M that divides it (e.g. pattern=2:4), or leave the layer out with exclude"
            )

    def pruned_count(self, numel: int) -> int:
        """How many entries of a matrix of ``numel`` entries this target prunes."""
        if self.structured:
            return numel // self.m * (self.m - self.n)
        return math.floor(self.sparsity * numel)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"{self.sparsity:g}"


def _quotas(groups: int, group_size: int, sparsity: float) -> Tensor:
    """Entries to prune in each of ``groups`` equal groups, summing to exactly floor(sparsity * total)."""
    bounds = torch.tensor([math.floor(sparsity * group_size * index) for index in range(groups + 1)])
    return bounds.diff()


def _keep_per_row(scores: Tensor, quotas: Tensor) -> Tensor:
    """Per row ``r``, the ``quotas[r]`` lowest scores pruned (stable order breaks ties)."""
    order = scores.argsort(dim=1, stable=True)
    ranks = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
    return torch.ones_like(scores, dtype=torch.bool).scatter_(1, order, ranks >= quotas.to(scores.device)[:, None])


def _keep_nm(scores: Tensor, n: int, m: int) -> Tensor:
    """The ``n`` highest scores of every group of ``m`` consecutive columns kept; among equal scores the
    first columns, on every device. (topk leaves ties to the device: on the de-quantized 4-bit teacher
    15 % of its groups of 4 tie at the 2:4 cut, and magnitude 2:4 scored 1127 on a CPU, 1663 on a GPU.)"""
    groups = scores.reshape(scores.shape[0], -1, m)
    top = groups.argsort(dim=-1, descending=True, stable=True)[..., :n]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True).reshape(scores.shape)


def keep_by_scores(scores: Tensor, target: SparsityTarget, per_row: bool) -> Tensor:
    """Mask keeping the highest ``scores``: N:M groups, each row apart (``per_row``), or the whole matrix."""
    if target.structured:
        return _keep_nm(scores, target.n, target.m)
    if per_row:
        return _keep_per_row(scores, _quotas(scores.shape[0], scores.shape[1], target.sparsity))
    flat = scores.reshape(1, -1)
    return _keep_per_row(flat, torch.tensor([target.pruned_count(flat.numel())])).reshape(scores.shape)


def magnitude(weight: Tensor, target: SparsityTarget) -> tuple[Tensor, Tensor]:
    target.check(weight)
    keep = keep_by_scores(weight.detach().float().abs(), target, per_row=False)
    return weight.detach() * keep, keep


def wanda(weight: Tensor, target: SparsityTarget, input_sq_norms: Tensor) -> tuple[Tensor, Tensor]:
    """``input_sq_norms[j]``: the sum over calibration tokens of ``x_j ** 2``."""
    target.check(weight)
    scores = weight.detach().float().abs() * input_sq_norms.float().sqrt()[None, :]
    keep = keep_by_scores(scores, target, per_row=True)
    return weight.detach() * keep, keep


def check_block_size(block_size: int, target: SparsityTarget) -> None:
    """SparseGPT prunes N:M groups within a block of columns: a block must hold whole groups."""
    if target.structured and block_size % target.m:
        raise ValueError(
            f"sparsegpt.block_size={block_size} must be a multiple of M={target.m} (pattern={target}): set "
            f"sparsegpt.block_size={max(1, block_size // target.m) * target.m}"
        )


def inverse_hessian_factor(hessian: Tensor, damp: float, name: str = "weight") -> Tensor:
    """The upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, dead inputs' diagonals set to 1."""
    hessian = hessian.clone()
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1.0
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for attempt in range(DAMP_RETRIES + 1):
        dampened = hessian + damp * 10**attempt * hessian.diagonal().mean() * eye
        factor, info = torch.linalg.cholesky_ex(dampened)
        if info == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return upper
    raise ValueError(
        f"{name}: the input Hessian is not positive definite even with dampening {damp * 10**DAMP_RETRIES:g} "
        "x mean(diag H); use more calibration samples or a larger damp"
    )


def sparsegpt(
    weight: Tensor,
    target: SparsityTarget,
    hessian: Tensor,
    block_size: int = 128,
    damp: float = 0.01,
    name: str = "weight",
) -> tuple[Tensor, Tensor]:
    """SparseGPT's pruning with error compensation; the math runs in ``hessian``'s dtype (fp32 or fp64)."""
    target.check(weight, name)
    check_block_size(block_size, target)
    w = weight.detach().to(hessian.dtype).clone()
    rows, columns = w.shape
    factor = inverse_hessian_factor(hessian, damp, name)
    keep = torch.ones_like(w, dtype=torch.bool)
    quotas = None if target.structured else _quotas(math.ceil(columns / block_size), rows * block_size, target.sparsity)
    for block, start in enumerate(range(0, columns, block_size)):
        end = min(start + block_size, columns)
        if quotas is not None and end - start < block_size:  # the last, narrower block: the exact remainder
            quotas[block] = target.pruned_count(rows * columns) - int(quotas[:block].sum())
        _prune_block(w, keep, factor, start, end, target, None if quotas is None else int(quotas[block]))
    return w.to(weight.dtype), keep


def _prune_block(
    w: Tensor, keep: Tensor, factor: Tensor, start: int, end: int, target: SparsityTarget, quota: int | None
) -> None:
    """Prune columns ``start:end`` of ``w`` in place, then push their error onto the later columns."""
    block, inverse = w[:, start:end].clone(), factor[start:end, start:end]
    diagonal = inverse.diagonal()
    errors = torch.zeros_like(block)
    if quota is not None:
        block_keep = _keep_per_row((block**2 / diagonal[None, :] ** 2).reshape(1, -1), torch.tensor([quota]))
        keep[:, start:end] = block_keep.reshape(block.shape)
    for column in range(end - start):
        if target.structured and column % target.m == 0:
            group = slice(column, column + target.m)
            scores = block[:, group] ** 2 / diagonal[None, group] ** 2
            keep[:, start + column : start + column + target.m] = _keep_nm(scores, target.n, target.m)
        kept_weights = block[:, column] * keep[:, start + column]
        error = (block[:, column] - kept_weights) / diagonal[column]
        block[:, column:] -= error[:, None] * inverse[column, column:][None, :]
        block[:, column] = kept_weights
        errors[:, column] = error
    w[:, start:end] = block
    w[:, end:] -= errors @ factor[start:end, end:]
