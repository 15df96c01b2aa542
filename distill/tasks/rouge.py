"""ROUGE-L between a generated response and a reference (MiniLLM's protocol for distilled LMs).

Tokens as ``rouge_score`` makes them without stemming: lowercase, every run of characters other
than ``a-z0-9`` a separator. ROUGE-L is the F-measure (β = 1) of the longest common subsequence
of the two token lists: ``2 · P · R / (P + R)`` with ``P = LCS / |candidate|``, ``R = LCS / |reference|``;
0 when either side is empty.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

SEPARATORS = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    return [token for token in SEPARATORS.split(text.lower()) if token]


def longest_common_subsequence(first: Sequence[str], second: Sequence[str]) -> int:
    """Length of the LCS, by the two-row dynamic programme (O(|first|·|second|) time, O(|second|) memory)."""
    previous = [0] * (len(second) + 1)
    for item in first:
        current = [0]
        for column, other in enumerate(second):
            current.append(previous[column] + 1 if item == other else max(previous[column + 1], current[column]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F-measure of ``candidate`` against ``reference``, in [0, 1]."""
    candidate_tokens, reference_tokens = rouge_tokens(candidate), rouge_tokens(reference)
    common = longest_common_subsequence(candidate_tokens, reference_tokens)
    if common == 0:
        return 0.0
    precision, recall = common / len(candidate_tokens), common / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)
