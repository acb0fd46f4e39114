"""DAPO overlong reward shaping (algorithms/overlong.py) on a hand-made batch, against DAPO's Eq. 13 and a
transcription of verl's DAPO reward manager."""

from __future__ import annotations

import pytest
import torch

from luspo_megatron.algorithms.overlong import (
    apply_overlong_penalty,
    check_overlong,
    overlong_metrics,
    overlong_penalty,
)
from luspo_megatron.errors import ConfigError

# L_max = 20 (response limit), L = 4 (buffer): L_max − L = 16 is the longest response without a penalty.
L_MAX, BUFFER = 20, 4
LENGTHS = torch.tensor([3, 15, 16, 17, 18, 19, 20, 24])


def test_soft_overlong_punishment_equals_dapo_on_a_hand_made_batch():
    # R_len(|y|) = 0 for |y| ≤ 16; ((20 − 4) − |y|) / 4 · f for 16 < |y| ≤ 20; −f beyond 20 (DAPO Eq. 13, f = 1):
    #   |y| = 3, 15, 16      → 0
    #   |y| = 17             → (16 − 17)/4 = −0.25
    #   |y| = 18             → (16 − 18)/4 = −0.5
    #   |y| = 19             → (16 − 19)/4 = −0.75
    #   |y| = 20             → (16 − 20)/4 = −1
    #   |y| = 24 > L_max     → −1
    expected = [0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0]
    assert overlong_penalty(LENGTHS, L_MAX, BUFFER).tolist() == expected
    # f = 0.5 halves every value: −0.125, −0.25, −0.375, −0.5, −0.5.
    assert overlong_penalty(LENGTHS, L_MAX, BUFFER, 0.5).tolist() == [0.0, 0.0, 0.0, -0.125, -0.25, -0.375, -0.5, -0.5]
    # The shaped reward is the score plus R_len.
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    shaped = apply_overlong_penalty(rewards, LENGTHS, L_MAX, BUFFER)
    assert shaped.dtype == torch.float64
    assert shaped.tolist() == [1.0, 0.0, 1.0, 0.75, -0.5, 0.25, 0.0, -1.0]


@pytest.mark.parametrize("factor", [1.0, 0.3])
def test_equals_verls_dapo_reward_manager_within_the_response_limit(factor):
    # verl DAPORewardManager.run_single: exceed_len = |y| − (L_max − L);
    # overlong_reward = min(−exceed_len / L · f, 0)
    lengths = torch.arange(0, L_MAX + 1)
    expected = [min(-(int(n) - (L_MAX - BUFFER)) / BUFFER * factor, 0) for n in lengths]
    assert overlong_penalty(lengths, L_MAX, BUFFER, factor).tolist() == pytest.approx(expected, abs=1e-15)


def test_overlong_metrics_count_shaped_and_filtered_samples():
    penalty = overlong_penalty(LENGTHS, L_MAX, BUFFER)
    truncated = LENGTHS >= L_MAX  # finish reason "length"
    m = overlong_metrics(penalty, truncated)
    assert m == {"overlong_shaped": 5.0, "overlong_shaped_frac": 5 / 8,
                 "overlong_penalty_mean": (-0.25 - 0.5 - 0.75 - 1.0 - 1.0) / 8, "overlong_filtered": 2.0}
    assert "overlong_filtered" not in overlong_metrics(penalty)


@pytest.mark.parametrize(
    "args,field",
    [((20, 0, 1.0), "overlong_buffer_len"), ((20, 21, 1.0), "overlong_buffer_len"),
     ((20, 4, -0.5), "overlong_penalty_factor")],
)
def test_bad_overlong_config_gives_one_line_error_naming_the_field(args, field):
    with pytest.raises(ConfigError) as info:
        check_overlong(*args)
    assert info.value.field == field and field in str(info.value) and "\n" not in str(info.value)
    check_overlong(20, 20, 0.0)  # L = L_max (every response shaped) and f = 0 are allowed
