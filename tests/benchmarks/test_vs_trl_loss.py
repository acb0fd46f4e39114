"""The LUSPO loss of TRL's GRPOTrainer and ours agree on identical inputs (benchmarks/vs_trl.py).

Skipped without TRL (``make bench-deps`` installs it). One fixed batch, float64, no sampling:
TRL's own ``GRPOTrainer._compute_loss`` (loss_type="luspo", importance_sampling_level="sequence")
against ``policy_loss(LossConfig("luspo"), num_sequences=B)`` and the written-out formula
(1/B) Σ_i |y_i| ℓ_i, values and parameter gradients.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("trl")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "vs_trl.py"


@pytest.fixture(scope="module")
def check() -> dict:
    spec = importlib.util.spec_from_file_location("vs_trl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.loss_on_fixed_batch()
    print(result)
    return result


def test_fixed_batch_straddles_the_clip_range(check):
    # Both branches of the clipped surrogate are exercised, or agreement would prove less.
    assert 0 < check["clipped_sequences"] < check["sequences"]


def test_luspo_loss_and_gradient_equal_trl_on_the_same_logprobs(check):
    # Same log-probs (TRL's own forward): only the ratio/clip/aggregation differ in code, so float64 exact.
    assert check["abs_diff_same_logps"] <= 1e-12
    assert check["grad_max_abs_diff_same_logps"] <= 1e-12 * max(1.0, check["grad_max_abs"])


def test_luspo_loss_matches_trl_within_1e_4_with_separate_forwards(check):
    # Our own forward vs TRL's (whose fused lm-head returns float32 log-probs): the 1e-4 bar.
    assert check["abs_diff"] < 1e-4
    assert check["grad_max_abs_diff"] < 1e-4


def test_our_luspo_loss_is_the_length_weighted_sequence_mean(check):
    # Independent oracle: (1/B) Σ_i |y_i| ℓ_i from the same float64 log-probs as ours.
    assert check["ours"] == pytest.approx(check["oracle"], abs=1e-12)
    assert check["trl"] != 0.0
