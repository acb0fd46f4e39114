"""math-verify rewards in a process pool: equivalences, timeouts, crashed and stuck workers."""

from __future__ import annotations

import pytest

from luspo_megatron.errors import ConfigError
from luspo_megatron.rewards import RewardPool, build_reward
from luspo_megatron.rewards.format import format_score
from luspo_megatron.rewards.math import MATH_SCORE, last_boxed

EQUIVALENT = [  # (response, ground truth): known-equal answers (offline_deps.md §3.2, plus a few)
    ("so the answer is \\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{1/2}", "\\frac{1}{2}"),
    ("\\boxed{x^2+2x+1}", "(x+1)^2"),
    ("\\boxed{\\sqrt{2}}", "2^{1/2}"),
    ("\\boxed{\\{2, 1\\}}", "\\{1, 2\\}"),
    ("\\boxed{58}", "58"),
    ("first \\boxed{3} then finally \\boxed{58.0}", "58"),
    ("\\boxed{\\dfrac{3}{4}}", "0.75"),
]
NOT_EQUIVALENT = [
    ("\\boxed{0.49}", "0.5"),
    ("\\boxed{58} then \\boxed{57}", "58"),  # the last box counts
    ("the answer is 58", "58"),  # no box
    ("\\boxed{58", "58"),  # cut inside the box
    ("\\boxed{}", "58"),
    ("\\boxed{x^2+1}", "(x+1)^2"),
]


@pytest.fixture(scope="module")
def pool():
    """Generous timeout: sympy on a loaded 2-core CI box can take a while."""
    with RewardPool(num_workers=2, timeout_s=20.0, preload=(MATH_SCORE,)) as p:
        yield p


@pytest.fixture(scope="module")
def fast_pool():
    """Short timeout and guard, for the items that never finish (each costs a timeout)."""
    with RewardPool(num_workers=2, timeout_s=0.5, grace_s=0.5, preload=(MATH_SCORE,)) as p:
        yield p


def test_equivalent_answers_score_one(pool):
    scores, stats = pool.score(MATH_SCORE, [(r, g, None) for r, g in EQUIVALENT])
    assert scores == [1.0] * len(EQUIVALENT), [r for (r, _), s in zip(EQUIVALENT, scores) if s != 1.0]
    assert stats.timeouts == stats.errors == stats.crashed_items == 0


def test_non_equivalent_answers_score_zero(pool):
    scores, _ = pool.score(MATH_SCORE, [(r, g, None) for r, g in NOT_EQUIVALENT])
    assert scores == [0.0] * len(NOT_EQUIVALENT)


def test_a_slow_item_times_out_scores_zero_and_is_counted(fast_pool):
    items = [("ok", "x", None), ("slow", "x", None), ("ok", "x", None)]
    for fn in ("tests.rewards.helpers:sleepy", "tests.rewards.helpers:busy"):
        scores, stats = fast_pool.score(fn, items)
        assert scores == [1.0, 0.0, 1.0] and stats.timeouts == 1 and stats.pool_restarts == 0


def test_math_verify_blowup_is_cut_by_the_item_timeout(fast_pool):
    # math-verify on 9^(9^(9^9)) vs 10^(10^(10^10)) runs for seconds (offline_deps.md §3.3).
    scores, stats = fast_pool.score(MATH_SCORE, [("\\boxed{9^{9^{9^{9}}}}", "10^{10^{10^{10}}}", None),
                                            ("\\boxed{2}", "2", None)])
    assert scores == [0.0, 1.0] and stats.timeouts == 1


def test_a_crashed_worker_is_replaced_and_its_items_rescored(pool, tmp_path):
    marker = str(tmp_path / "crashed")
    items = [("ok", "x", marker)] * 3 + [("crash", "x", marker)] + [("ok", "x", marker)] * 3
    scores, stats = pool.score("tests.rewards.helpers:crash_once", items)
    assert scores == [1.0] * len(items)  # the crashing item too: rescored after its worker died
    assert stats.pool_restarts >= 1 and stats.crashed_items == 0


def test_an_item_that_always_kills_its_worker_scores_zero_and_is_counted(pool):
    items = [("ok", "x", None), ("crash", "x", None), ("ok", "x", None), ("ok", "x", None)]
    scores, stats = pool.score("tests.rewards.helpers:crash_always", items)
    assert scores == [1.0, 0.0, 1.0, 1.0] and stats.crashed_items == 1
    assert pool.score("tests.rewards.helpers:echo", [("a", "a", None)])[0] == [1.0]  # the pool still works


def test_a_worker_stuck_beyond_the_signal_is_killed_and_counted_as_timeout(fast_pool):
    items = [("ok", "x", None), ("stuck", "x", None), ("ok", "x", None)]
    scores, stats = fast_pool.score("tests.rewards.helpers:unreachable", items)
    assert scores == [1.0, 0.0, 1.0] and stats.timeouts == 1 and stats.pool_restarts >= 1


def test_a_raising_reward_scores_zero_and_reports_the_error(pool):
    scores, stats = pool.score("tests.rewards.helpers:raises", [("bug", "x", None), ("ok", "x", None)])
    assert scores == [0.0, 1.0] and stats.errors == 1
    assert "ZeroDivisionError: user reward bug" in stats.error_examples[0]


def test_rewards_compose_with_weights():
    responses = ["<think>2+2</think> \\boxed{4}", "\\boxed{5}", "4", "<think>a</think><think>b</think> \\boxed{4}"]
    with build_reward("math+format", format_weight=0.25, num_workers=1) as reward:
        result = reward(responses, ["4"] * 4)
    assert result.terms == {"math": [1.0, 0.0, 0.0, 1.0], "format": [1.0, 1.0, 0.0, 0.0]}
    assert result.rewards == [1.25, 0.25, 0.0, 1.0]


def test_custom_reward_path_runs_in_the_pool_and_bad_paths_are_one_line_config_errors():
    with build_reward(custom_reward_path="tests.rewards.helpers:echo", num_workers=1) as reward:
        assert reward(["a", "b"], ["a", "a"]).rewards == [1.0, 0.0]
    for path, message in (("no.such.module:f", "cannot import module"),
                          ("luspo_megatron.rewards.math:nope", "has no function 'nope'")):
        with pytest.raises(ConfigError, match=f"--custom-reward-path: .*{message}") as err:
            build_reward(custom_reward_path=path)
        assert "\n" not in str(err.value)


def test_format_reward_accepts_an_optional_think_block_then_a_boxed_answer():
    assert format_score("<think>work</think>\nSo \\boxed{3}") == 1.0
    assert format_score("So \\boxed{3}") == 1.0
    assert format_score("So \\boxed{3}", require_think=True) == 0.0
    assert format_score("<think>work</think>") == 0.0  # no answer after thinking
    assert format_score("<think>work \\boxed{3}") == 0.0  # never closed
    assert format_score("x <think>w</think> \\boxed{3}") == 0.0  # think block not first


def test_last_boxed_balances_braces():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{1} \\fbox{2}") == "2"
    assert last_boxed("\\boxed{\\frac{1}{2}") is None and last_boxed("none") is None
