"""pass@k and avg@k against an exact enumeration of k-subsets, exact binomials, and hand cases."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import pytest

from luspo_megatron.algorithms.passk import eval_metrics, pass_at_k, powers_of_two_up_to


def enumerated_pass_at_k(outcomes: list[bool], k: int) -> float:
    """The fraction of k-subsets of the samples that hold at least one correct sample, exactly."""
    subsets = list(itertools.combinations(outcomes, k))
    return float(Fraction(sum(any(s) for s in subsets), len(subsets)))


@pytest.mark.parametrize("n", range(1, 10))
def test_pass_at_k_equals_the_enumeration_of_all_k_subsets(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(enumerated_pass_at_k(outcomes, k), rel=0, abs=1e-14), (n, c, k)


def test_edge_cases_are_exact():
    for n in range(1, 12):
        for k in range(1, n + 1):
            assert pass_at_k(n, 0, k) == 0.0  # nothing correct
            assert pass_at_k(n, n, k) == 1.0  # everything correct
        for c in range(1, n + 1):
            assert pass_at_k(n, c, n) == 1.0  # k = n: the one subset is all samples
        assert pass_at_k(n, 0, n) == 0.0


def test_hand_cases():
    assert pass_at_k(2, 1, 1) == pytest.approx(0.5, abs=1e-15)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5, abs=1e-15)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6, abs=1e-15)  # 1 - C(2,2)/C(4,2) = 1 - 1/6
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9, abs=1e-15)  # 1 - C(3,3)/C(5,3) = 1 - 1/10
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8, abs=1e-15)  # pass@1 is the accuracy


@pytest.mark.parametrize("n,c,k", [(1024, 3, 512), (1024, 1, 1), (512, 100, 64), (300, 299, 2), (2000, 7, 1000)])
def test_large_n_matches_exact_integer_binomials(n, c, k):
    exact = float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))  # C(1024, 512) ~ 1e306: no float could hold it
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)


def test_powers_of_two_up_to_k():
    assert powers_of_two_up_to(1) == [1]
    assert powers_of_two_up_to(4) == [1, 2, 4]
    assert powers_of_two_up_to(6) == [1, 2, 4]
    assert powers_of_two_up_to(16) == [1, 2, 4, 8, 16]
    assert powers_of_two_up_to(31) == [1, 2, 4, 8, 16]


def test_eval_metrics_hand_case():
    correct = [[1, 0, 0, 0], [True, True, False, False], [0, 0, 0, 0]]
    lens = [[10, 20, 30, 40], [5, 5, 5, 5], [100, 0, 0, 0]]
    truncated = [[False, False, False, True], [False] * 4, [True, False, False, False]]
    m = eval_metrics(correct, lens, truncated)
    assert set(m) == {"avg@4", "pass@1", "pass@2", "pass@4", "response_len_mean", "truncation_rate"}
    assert m["avg@4"] == pytest.approx((1 / 4 + 2 / 4 + 0) / 3, abs=1e-15)  # 0.25
    assert m["pass@1"] == pytest.approx(0.25, abs=1e-15)
    assert m["pass@2"] == pytest.approx((1 / 2 + 5 / 6 + 0) / 3, abs=1e-15)  # 4/9
    assert m["pass@4"] == pytest.approx((1 + 1 + 0) / 3, abs=1e-15)
    assert m["response_len_mean"] == pytest.approx(220 / 12, abs=1e-12)
    assert m["truncation_rate"] == pytest.approx(2 / 12, abs=1e-15)


def test_eval_metrics_equal_per_prompt_enumeration_averaged_over_prompts():
    rng = random.Random(7)
    for k in (1, 2, 3, 4, 6, 8):
        correct = [[rng.random() < p for _ in range(k)] for p in (0.0, 0.1, 0.3, 0.5, 0.9, 1.0, 0.5)]
        m = eval_metrics(correct)
        ks = [kk for kk in range(1, k + 1) if kk & (kk - 1) == 0]  # the powers of 2 ≤ k
        assert set(m) == {f"avg@{k}"} | {f"pass@{kk}" for kk in ks}  # no pass@6: 6 is not a power of 2
        assert m[f"avg@{k}"] == pytest.approx(sum(sum(r) / k for r in correct) / len(correct), abs=1e-15)
        for kk in ks:
            want = sum(enumerated_pass_at_k(r, kk) for r in correct) / len(correct)
            assert m[f"pass@{kk}"] == pytest.approx(want, abs=1e-14), (k, kk)


def test_bad_input_is_a_one_line_value_error():
    for args, message in (
        (([],), "correct: expected at least one prompt"),
        (([[1, 0], [1]],), "correct: expected 2 samples for every prompt .* prompt 1 has 1"),
        (([[1, 0.5]],), "correct: expected booleans or 0/1"),
        (([[1, 0]], [[3, 4], [5, 6]]), "response_lens: expected 1 prompts"),
        (([[1, 0]], None, [[True]]), "truncated: expected 2 samples"),
    ):
        with pytest.raises(ValueError, match=message):
            eval_metrics(*args)
    with pytest.raises(ValueError, match="1 ≤ k ≤ n, got n=2, c=1, k=3"):
        pass_at_k(2, 1, 3)
