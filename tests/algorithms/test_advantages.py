"""Group advantages (GRPO / Dr.GRPO) and DAPO's uniform-group filter against direct formulas."""

import pytest
import torch

from luspo_megatron.algorithms.advantages import filter_uniform_groups, group_advantages


def test_grpo_advantage_is_group_zscore_with_unbiased_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.25, 0.0, 1.0], dtype=torch.float64)
    adv = group_advantages(rewards, group_size=4)
    for g in range(2):
        r = rewards[4 * g: 4 * g + 4].tolist()
        mean = sum(r) / 4
        std = (sum((x - mean) ** 2 for x in r) / 3) ** 0.5
        expected = [(x - mean) / (std + 1e-6) for x in r]
        assert adv[4 * g: 4 * g + 4].tolist() == pytest.approx(expected, abs=1e-12)


def test_dr_grpo_advantage_is_only_centred():
    rewards = torch.tensor([3.0, 1.0, 2.0, 2.0], dtype=torch.float64)
    assert group_advantages(rewards, 2, std_normalize=False).tolist() == [1.0, -1.0, 0.0, 0.0]


@pytest.mark.parametrize("std_normalize", [True, False])
def test_uniform_groups_get_exactly_zero_advantage(std_normalize):
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.3, 0.3, 0.3])
    adv = group_advantages(rewards, 3, std_normalize=std_normalize)
    assert (adv == 0).all()
    assert group_advantages(torch.tensor([1.0, 0.0]), 1).tolist() == [0.0, 0.0]  # G = 1: no baseline signal


def test_group_advantages_rejects_a_group_size_that_does_not_divide():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(6), 4)


def test_filter_uniform_groups_keeps_only_groups_with_signal():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5])
    assert filter_uniform_groups(rewards, 2).tolist() == [False, True, False, False]
