"""score_answer in its three modes (boxed, dapo, auto) on hand-checked cases, including
DAPO-Math-17k's answer styles; the dapo and auto rewards through the pool, with a timeout.

Every expected score below was worked out by hand from the rules in rewards/math.py: boxed = the
last complete ``\\boxed{}``; dapo = the last ``Answer:`` line in the last 300 characters, Minerva-
normalised as verl's math_dapo does, then equal strings or math-verify equivalence; auto = boxed if
a non-empty complete box exists, else dapo.
"""

from __future__ import annotations

import pytest

from luspo_megatron.errors import ConfigError
from luspo_megatron.rewards import RewardPool, build_reward
from luspo_megatron.rewards.compose import REWARD_KINDS
from luspo_megatron.rewards.math import (
    AUTO_SCORE,
    DAPO_SCORE,
    MATH_SCORE,
    dapo_score,
    last_answer_line,
    normalize_dapo_answer,
    score_answer,
)

PROMPT_TAIL = "Let me compute step by step.\n2 + 2 = 4, and 4 * 8 = 32, so 32 + 2 = 34.\n"

CASES = [  # (id, response, ground truth, mode, expected score)
    # --- boxed (what --reward math reads)
    ("boxed-int", "so \\boxed{34}", "34", "boxed", 1.0),
    ("boxed-negative", "the sum is \\boxed{-7}.", "-7", "boxed", 1.0),
    ("boxed-frac-vs-decimal", "\\boxed{\\frac{1}{2}}", "0.5", "boxed", 1.0),
    ("boxed-wrong", "\\boxed{35}", "34", "boxed", 0.0),
    ("boxed-last-box-counts", "first \\boxed{3}, then \\boxed{4}", "4", "boxed", 1.0),
    ("boxed-earlier-box-ignored", "first \\boxed{3}, then \\boxed{4}", "3", "boxed", 0.0),
    ("boxed-unclosed", "\\boxed{\\frac{1}{2}", "\\frac{1}{2}", "boxed", 0.0),
    ("boxed-ignores-answer-line", PROMPT_TAIL + "Answer: 34", "34", "boxed", 0.0),
    # --- dapo (the last "Answer:" line)
    ("dapo-int", PROMPT_TAIL + "Answer: 34", "34", "dapo", 1.0),
    ("dapo-wrong-int", PROMPT_TAIL + "Answer: 33", "34", "dapo", 0.0),
    ("dapo-negative", "Answer: -12", "-12", "dapo", 1.0),
    ("dapo-sign-matters", "Answer: -12", "12", "dapo", 0.0),
    ("dapo-dollar-frac", "Answer: $\\frac{1}{2}$", "\\frac{1}{2}", "dapo", 1.0),
    ("dapo-dollar-frac-vs-decimal", "Answer: $\\frac{1}{2}$", "0.5", "dapo", 1.0),  # math-verify
    ("dapo-frac-vs-wrong-decimal", "Answer: $\\frac{1}{2}$", "0.25", "dapo", 0.0),
    ("dapo-shorthand-frac", "Answer: \\frac12", "\\frac{1}{2}", "dapo", 1.0),
    ("dapo-slash-frac", "Answer: 1/2", "\\frac{1}{2}", "dapo", 1.0),
    ("dapo-sqrt", "Answer: $2\\sqrt{3}$", "2\\sqrt3", "dapo", 1.0),
    ("dapo-unit-word", "Answer: 12 cm", "12", "dapo", 1.0),
    ("dapo-text-unit", "Answer: 10 \\text{ students}", "10", "dapo", 1.0),
    ("dapo-escaped-dollar-thousands", "Answer: \\$1,000", "1000", "dapo", 1.0),
    ("dapo-degrees", "Answer: $90^\\circ$", "90", "dapo", 1.0),
    ("dapo-equation-rhs", "Answer: x = 5", "5", "dapo", 1.0),
    ("dapo-trailing-period", "Answer: 34.", "34", "dapo", 1.0),  # verl: "34." != "34"; math-verify: equal
    ("dapo-boxed-inside-line", "Answer: \\boxed{34}", "34", "dapo", 1.0),
    ("dapo-text-answer", "Answer: \\text{Monday}", "\\text{Monday}", "dapo", 1.0),
    ("dapo-lower-case", "that is the answer.\nanswer: 7", "7", "dapo", 1.0),
    ("dapo-answer-on-next-line", "Answer:\n34", "34", "dapo", 1.0),  # \s* after the colon spans the newline
    ("dapo-last-line-counts", "Answer: 3\nWait, I made an error.\nAnswer: 4", "4", "dapo", 1.0),
    ("dapo-earlier-line-ignored", "Answer: 3\nWait, I made an error.\nAnswer: 4", "3", "dapo", 0.0),
    ("dapo-no-answer-line", PROMPT_TAIL + "The answer is 34.", "34", "dapo", 0.0),
    ("dapo-empty-response", "", "34", "dapo", 0.0),
    ("dapo-empty-answer", "Answer: \n", "34", "dapo", 0.0),
    ("dapo-ignores-box", "\\boxed{34}", "34", "dapo", 0.0),
    ("dapo-line-beyond-tail", "Answer: 34\n" + "I double-checked it. " * 20, "34", "dapo", 0.0),  # 420 chars after
    ("dapo-line-within-tail", "Answer: 34\n" + "I double-checked it. " * 10, "34", "dapo", 1.0),  # 210 chars after
    # --- auto (boxed if present, else the Answer line)
    ("auto-boxed", "\\boxed{34}", "34", "auto", 1.0),
    ("auto-answer-line", PROMPT_TAIL + "Answer: 34", "34", "auto", 1.0),
    ("auto-answer-line-frac", "Answer: $\\frac{1}{2}$", "\\frac{1}{2}", "auto", 1.0),
    ("auto-box-wins-over-line", "\\boxed{33}\nAnswer: 34", "34", "auto", 0.0),
    ("auto-box-wins-when-right", "\\boxed{34}\nAnswer: 33", "34", "auto", 1.0),
    ("auto-empty-box-is-no-box", "\\boxed{}\nAnswer: 34", "34", "auto", 1.0),
    ("auto-dfrac-box", "\\boxed{\\dfrac{3}{4}}", "0.75", "auto", 1.0),
    ("auto-no-answer", "I am not sure.", "34", "auto", 0.0),
    ("auto-last-answer-line", "Answer: 5\nAnswer: -5", "-5", "auto", 1.0),
]


@pytest.mark.parametrize("response,ground_truth,mode,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_score_answer_hand_checked(response, ground_truth, mode, expected):
    assert score_answer(response, ground_truth, mode) == expected


def test_there_are_at_least_thirty_cases_across_all_modes():
    assert len(CASES) >= 30 and {c[3] for c in CASES} == {"boxed", "dapo", "auto"}


def test_default_mode_is_auto_and_unknown_modes_are_refused():
    assert score_answer("Answer: 34", "34") == 1.0 and score_answer("\\boxed{33}\nAnswer: 34", "34") == 0.0
    with pytest.raises(ValueError, match="mode: expected one of .*'boxed'.*got 'latex'"):
        score_answer("\\boxed{1}", "1", "latex")


def test_integer_labels_from_parquet_are_scored():
    assert dapo_score("Answer: 34", 34) == 1.0 and dapo_score("Answer: 35", 34) == 0.0


def test_normalisation_and_extraction_by_hand():
    assert normalize_dapo_answer("x = \\$1,000 dollars") == "1000"
    assert normalize_dapo_answer("$\\frac12$") == "\\frac{1}{2}"
    assert normalize_dapo_answer("\\textbf{\\text{5}}") == "5"  # \text first, then \textbf
    assert normalize_dapo_answer("an answer of $7$ or $8$") == "7"  # the first math span
    assert normalize_dapo_answer("12 square feet") == "12"
    assert last_answer_line("Answer: 1\nANSWER :  2 apples\nmore") == "2 apples"
    assert last_answer_line("no line") is None


# ------------------------------------------------------------------------------------ through the pool
@pytest.fixture(scope="module")
def fast_pool():
    with RewardPool(num_workers=2, timeout_s=0.5, grace_s=0.5, preload=(DAPO_SCORE, AUTO_SCORE)) as p:
        yield p


@pytest.mark.parametrize("fn", [DAPO_SCORE, AUTO_SCORE])
def test_a_blowup_answer_line_times_out_scores_zero_and_is_counted(fast_pool, fn):
    # math-verify on 9^(9^(9^9)) vs 10^(10^(10^10)) runs for seconds (offline_deps.md §3.3).
    items = [("Answer: 9^{9^{9^{9}}}", "10^{10^{10^{10}}}", None), ("Answer: 2", "2", None)]
    scores, stats = fast_pool.score(fn, items)
    assert scores == [0.0, 1.0] and stats.timeouts == 1 and stats.errors == stats.crashed_items == 0


def test_reward_kinds_dapo_and_auto_score_through_the_pool():
    responses = ["\\boxed{34}", PROMPT_TAIL + "Answer: 34", "\\boxed{33}\nAnswer: 34", "Answer: $\\frac{1}{2}$"]
    labels = ["34", "34", "34", "0.5"]
    expected = {"math": [1.0, 0.0, 0.0, 0.0], "dapo": [0.0, 1.0, 1.0, 1.0], "auto": [1.0, 1.0, 0.0, 1.0]}
    for kind, want in expected.items():
        with build_reward(kind, num_workers=1, timeout_s=20.0) as reward:
            result = reward(responses, labels)
        assert result.rewards == want, kind
        assert result.terms == {"math": want}  # the trainer reads correctness from the "math" term
        assert result.stats.timeouts == result.stats.errors == 0


def test_unknown_reward_kind_is_a_one_line_config_error_listing_the_choices():
    assert REWARD_KINDS == ("math", "math+format", "dapo", "auto")
    with pytest.raises(ConfigError, match="--reward: expected one of .*'dapo', 'auto'.*got 'boxed'"):
        build_reward("boxed")


def test_math_is_still_the_boxed_reader():
    assert MATH_SCORE.endswith(":math_score")
    with build_reward("math+format", format_weight=0.5, num_workers=1, timeout_s=20.0) as reward:
        result = reward(["Answer: 34", "\\boxed{34}"], ["34", "34"])
    assert result.terms == {"math": [0.0, 1.0], "format": [0.0, 1.0]} and result.rewards == [0.0, 1.5]
