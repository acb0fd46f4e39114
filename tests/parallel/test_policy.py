"""The trainer-facing MegatronPolicy: from the run config to a step and a weight-sync export."""

from pathlib import Path

import pytest

from tests.distributed import run_worker


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return run_worker(Path(__file__).with_name("policy_worker.py"), 1, tmp_path_factory.mktemp("policy") / "p.pt")


def test_preset_starts_from_its_seeded_transformers_weights_with_the_real_vocab(policy):
    assert policy["initial_equal"] and policy["vocab"] == 151936


def test_lr_warms_up_from_zero_with_megatrons_schedule(policy):
    assert [m["lr"] for m in policy["metrics"]] == [0.0, 5e-4, 1e-3]
    first, second, third = policy["metrics"]
    assert first["loss"] == second["loss"]  # lr 0: the first step changed nothing
    assert third["mean_abs_log_ratio"] > 0 and policy["changed"] > 1e-4


def test_exported_weights_give_transformers_the_same_logprobs(policy):
    """Weight sync: the trained Megatron weights, exported as a HF directory and run by
    transformers, give the log-probs the policy computes (temperature 0.8, token-aligned)."""
    assert policy["logp_vs_transformers"] <= 1e-5


def test_a_nan_gradient_skips_the_update_and_is_counted(policy):
    assert policy["nan_step"]["skipped"] == 1.0 and policy["skipped_kept_weights"]
