"""N:M structured-sparsity masks; for 2:4 identical to APEX ASP's ``m4n2_1d`` calculator.

Rule (ASP, ``apex/contrib/sparsity/sparse_masklib.py``): view the weight as a matrix whose
columns are input channels, cut every row into groups of ``m`` consecutive entries and keep, in
each group, the ``n``-of-``m`` pattern with the largest sum of ``|w|`` (fp32). Ties go to the
first pattern in ASP's candidate order, ``list(set(permutations([1] * n + [0] * (m - n))))``,
which for 2:4 is ``(0,1,0,1), (1,1,0,0), (0,1,1,0), (1,0,1,0), (1,0,0,1), (0,0,1,1)``; so an
all-zero group keeps positions 1 and 3, not the 0 and 1 that ``topk`` would.

Layouts follow ASP: a 2-D weight is read as a Linear's ``(out, in)``; Conv1d ``(K, C, R)`` and Conv2d
``(K, C, R, S)`` weights are grouped along ``C`` at every kernel position and output channel. GPT-2's
``transformers`` ``Conv1D`` stores its matrix as ``(in, out)``: callers pass its ``(out, in)`` view
(``distill.architectures.linears.linear_weight``) and transpose the mask back.
"""

from __future__ import annotations

import functools
from itertools import permutations
from math import comb

import torch
from torch import Tensor

# Beyond this many candidate patterns, scoring every pattern costs more memory than it is worth;
# keeping the n largest per group (ties to the lower index) gives the same masks except on ties.
MAX_SCORED_PATTERNS = 70
_GROUP_CHUNK = 1 << 18


def check_nm(n: int, m: int) -> None:
    """Raise ``ValueError`` naming ``n``/``m`` unless ``0 < n < m``."""
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise ValueError(f"N:M sparsity needs integers 0 < N < M, got N={n!r}, M={m!r}")


@functools.cache
def asp_patterns(n: int, m: int) -> tuple[tuple[int, ...], ...]:
    """ASP's candidate patterns for N:M, in the order its ``argmax`` breaks ties."""
    return tuple(set(permutations([1] * n + [0] * (m - n))))


# Axis order that puts input channels last: Linear as is, Conv1d (K, C, R) -> (K, R, C),
# Conv2d (K, C, R, S) -> (R, S, K, C).
_CHANNELS_LAST = {2: (0, 1), 3: (0, 2, 1), 4: (2, 3, 0, 1)}


def _channels_last(weight: Tensor) -> Tensor:
    if weight.dim() not in _CHANNELS_LAST:
        raise ValueError(f"nm_mask supports 2-D (Linear), 3-D and 4-D (Conv) weights, got shape {tuple(weight.shape)}")
    return weight.permute(_CHANNELS_LAST[weight.dim()])


def _from_channels_last(permuted: Tensor) -> Tensor:
    order = _CHANNELS_LAST[permuted.dim()]
    return permuted.permute(tuple(order.index(axis) for axis in range(permuted.dim()))).contiguous()


def _best_pattern_mask(groups: Tensor, n: int, m: int) -> Tensor:
    patterns = torch.tensor(asp_patterns(n, m), dtype=torch.float32, device=groups.device)
    keep = torch.empty(groups.shape, dtype=torch.bool, device=groups.device)
    for start in range(0, groups.shape[0], _GROUP_CHUNK):
        chunk = groups[start : start + _GROUP_CHUNK]
        # Exact sums of the kept magnitudes (no TF32 matmul), argmax takes the first maximum.
        scores = (chunk.unsqueeze(1) * patterns).sum(dim=-1)
        keep[start : start + _GROUP_CHUNK] = patterns[scores.argmax(dim=-1)].bool()
    return keep


def _largest_n_mask(groups: Tensor, n: int) -> Tensor:
    order = groups.sort(dim=-1, descending=True, stable=True).indices[:, :n]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order, True)


def nm_mask(weight: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """Boolean mask (True = kept) with ``n`` kept entries in every group of ``m`` input channels."""
    check_nm(n, m)
    permuted = _channels_last(weight.detach())
    if permuted.shape[-1] % m:
        raise ValueError(f"N:M {n}:{m} needs the input dimension to be a multiple of {m}; weight {tuple(weight.shape)}")
    groups = permuted.float().abs().reshape(-1, m)
    keep = _best_pattern_mask(groups, n, m) if comb(m, n) <= MAX_SCORED_PATTERNS else _largest_n_mask(groups, n)
    return _from_channels_last(keep.reshape(permuted.shape))


def is_nm_sparse(weight: Tensor, n: int = 2, m: int = 4) -> bool:
    """True if every group of ``m`` input channels holds at most ``n`` non-zeros."""
    check_nm(n, m)
    permuted = _channels_last(weight.detach())
    if permuted.shape[-1] % m:
        return False
    return bool(((permuted.reshape(-1, m) != 0).sum(dim=-1) <= n).all())
