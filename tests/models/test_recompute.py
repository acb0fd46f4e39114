"""Activation recompute (--recompute-granularity / -method / -num-layers) changes memory, never the
gradient: every setting megatron-core accepts against the same model without recompute, with
sequential and grouped experts (recompute_worker.py). The flag checks are in test_megatron_config.py."""

from pathlib import Path

import pytest

from tests.distributed import run_worker

WORKER = Path(__file__).with_name("recompute_worker.py")
LAYERS = 4
# core attention runs per forward + backward: each layer once, recomputed layers twice
EXPECTED_CALLS = {"selective": 2 * LAYERS, "full_uniform_1": 2 * LAYERS, "full_uniform_2": 2 * LAYERS,
                  "full_block_2": LAYERS + 2}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_worker(WORKER, 1, tmp_path_factory.mktemp("recompute") / "out.pt")


@pytest.mark.parametrize("grouped", [False, True], ids=["sequential", "grouped"])
@pytest.mark.parametrize("setting", sorted(EXPECTED_CALLS))
def test_recompute_gives_the_gradient_without_recompute(results, setting, grouped):
    r = results[(grouped, setting)]
    assert r["attention_calls"] == (LAYERS, EXPECTED_CALLS[setting])  # recompute really ran
    assert r["largest_grad"] > 1.0 and r["num_grads"] > 50
    assert r["logits"] == 0.0 and r["grads"] == 0.0
