"""A reward that is NaN or ±Inf is an error naming the reward function and the sample (issue 19 §4):
one NaN would make every advantage of its group NaN, and the whole step with it."""

from __future__ import annotations

import math

import pytest

from luspo_megatron.errors import RewardError, UserError
from luspo_megatron.rewards import build_reward
from luspo_megatron.rewards.compose import Reward, RewardTerm

FN = "tests.rewards.helpers:nonfinite"


def test_a_custom_reward_returning_nan_or_inf_in_the_pool_is_one_line_naming_function_and_sample():
    with build_reward(custom_reward_path=FN, num_workers=1, timeout_s=20.0) as reward:
        ok = reward(["fine", "also fine"], ["1", "2"])
        assert ok.rewards == [1.0, 1.0]  # finite rewards pass unchanged
        for bad in ("nan", "inf", "-inf"):
            with pytest.raises(RewardError) as err:
                reward(["fine", "fine", bad, "fine"], ["1", "2", "3", "4"])
            assert isinstance(err.value, UserError)  # the CLI prints it in one line and exits 2
            assert str(err.value) == (f"reward 'custom' (--custom-reward-path {FN}) returned {float(bad)} for sample 2 "
                                      f"of 4 (response {bad!r}, label '3'): a reward must be a finite number")


def test_an_in_process_term_is_checked_and_the_excerpt_is_short_and_one_line():
    reward = Reward([RewardTerm("shaped", FN, in_pool=False)])
    assert reward(["fine"], ["1"]).rewards == [1.0]
    with pytest.raises(RewardError) as err:
        reward(["fine", "nan"], ["1", None])
    assert str(err.value).startswith(f"reward 'shaped' ({FN}) returned nan for sample 1 of 2 (response 'nan', "
                                     "label 'None')")
    long_response = "nan\nline two " + "x" * 500  # a long, multi-line response: 40 characters, escaped
    with pytest.raises(RewardError) as err:
        reward(["fine", "fine", long_response], ["1", "2", {"answer": 3}])
    message = str(err.value)
    assert f"sample 2 of 3 (response {long_response[:40] + '…'!r}, label \"{{'answer': 3}}\")" in message
    assert "\n" not in message and len(message) < 200


def test_finite_terms_whose_weighted_sum_overflows_are_refused_too():
    reward = Reward([RewardTerm("a", FN, in_pool=False), RewardTerm("b", FN, weight=2.0, in_pool=False)])
    assert math.isinf(1e308 + 2.0 * 1e308)  # the oracle: float64 overflow of R = Σ_k w_k·r_k
    with pytest.raises(RewardError, match=r"^the weighted sum of the reward terms is inf for sample 0 of 1 "
                                          r"\(response 'huge', label '5'\)"):
        reward(["huge"], ["5"])
