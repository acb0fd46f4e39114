"""The weight-version check of every sample (rollout/versions.py), by enumeration: each (pushed
version, sample version, allowed staleness) case against the rule written out in the test."""

from __future__ import annotations

import itertools

import pytest

from luspo_megatron.errors import RolloutError
from luspo_megatron.rollout.engine import Sample
from luspo_megatron.rollout.versions import check_weight_versions, version_number


def sample(version: str) -> Sample:
    return Sample([1], [2], [-0.5], "length", version)


def test_default_is_version_zero_and_step_numbers_are_themselves():
    assert version_number("default") == 0 and version_number("0") == 0 and version_number("17") == 17
    for foreign in ("step-7", "v1", "", "-1", "1.5"):
        with pytest.raises(RolloutError, match="another source"):
            version_number(foreign)


@pytest.mark.parametrize("step", [1, 2, 5])
@pytest.mark.parametrize("max_staleness", [0, 1, 2])
def test_every_version_is_accepted_counted_or_refused_by_its_lag_behind_the_last_push(step, max_staleness):
    # Step s samples after the push of version s − 1 ("default" when s − 1 = 0, or "0" after an SFT start).
    names = {v: ("default" if v == 0 else str(v)) for v in range(0, step + 2)}
    for a, b in itertools.product(range(0, step + 2), repeat=2):  # two samples' versions
        batch = [sample(names[a]), sample(names[b])]
        lags = [step - 1 - a, step - 1 - b]
        if all(0 <= lag <= max_staleness for lag in lags):
            assert check_weight_versions(batch, step, max_staleness) == sum(lag > 0 for lag in lags)
        else:
            with pytest.raises(RolloutError, match=f"step {step}: "):
                check_weight_versions(batch, step, max_staleness)


def test_the_errors_say_which_versions_and_what_went_wrong():
    # The 8-of-24 bug: a worker the client never updated, still on the run's first weights.
    batch = [sample("7")] * 16 + [sample("default")] * 8
    with pytest.raises(RolloutError, match=r"step 8: 8 of 24 samples carry weight_version \['default'\], more than "
                                           r"--max-weight-staleness 0 behind .* \(7\): an engine missed a weight sync"):
        check_weight_versions(batch, 8)
    with pytest.raises(RolloutError, match=r"step 1: 2 samples carry weight_version \['40'\], newer than"):
        check_weight_versions([sample("40")] * 2, 1)  # a previous run's servers
    assert check_weight_versions([sample("0")] * 3, 1) == 0  # an SFT warm-up pushes "0" before step 1


def test_max_weight_staleness_is_a_count_of_versions():
    from luspo_megatron.config import RolloutConfig
    from luspo_megatron.errors import ConfigError

    assert RolloutConfig().weight_staleness_bound == 0
    assert RolloutConfig(max_weight_staleness=2).weight_staleness_bound == 2
    with pytest.raises(ConfigError, match=r"--max-weight-staleness: expected ≥ 1 with --async-rollout \(≥ 0 without"):
        RolloutConfig(max_weight_staleness=-1)
