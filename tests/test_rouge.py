"""ROUGE-L as MiniLLM scores distilled responses."""

from __future__ import annotations

import itertools

import pytest

from distill.tasks.rouge import longest_common_subsequence, rouge_l, rouge_tokens


def brute_force_lcs(first: list[str], second: list[str]) -> int:
    for size in range(min(len(first), len(second)), 0, -1):
        subsequences = set(itertools.combinations(second, size))
        if any(candidate in subsequences for candidate in itertools.combinations(first, size)):
            return size
    return 0


def test_tokens_are_lowercase_alphanumeric_runs() -> None:
    assert rouge_tokens("To be, or NOT to-be: that's it!") == ["to", "be", "or", "not", "to", "be", "that", "s", "it"]


@pytest.mark.parametrize("seed", range(20))
def test_lcs_matches_a_brute_force_search(seed: int) -> None:
    import random

    rng = random.Random(seed)
    first = [rng.choice("abcd") for _ in range(rng.randint(0, 7))]
    second = [rng.choice("abcd") for _ in range(rng.randint(0, 7))]
    assert longest_common_subsequence(first, second) == brute_force_lcs(first, second)


def test_rouge_l_f_measure() -> None:
    # LCS "the cat the mat" = 4 of 6 candidate and 5 reference tokens: P = 4/6, R = 4/5.
    expected = 2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5)
    assert rouge_l("the cat sat on the mat", "the cat ate the mat") == pytest.approx(expected)
    assert rouge_l("same words here", "Same, words here.") == 1.0
    assert rouge_l("", "reference") == 0.0
    assert rouge_l("nothing shared", "at all") == 0.0
