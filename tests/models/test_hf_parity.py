"""Parity with Hugging Face: same weights, same logits (float32, one process)."""

from pathlib import Path

import pytest

from tests.distributed import run_worker
from tests.models.parity_worker import CASES

WORKER = Path(__file__).with_name("parity_worker.py")


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    return run_worker(WORKER, 1, tmp_path_factory.mktemp("parity") / "parity.pt")


@pytest.mark.parametrize("case", sorted(CASES))
def test_megatron_logits_equal_transformers_logits(parity, case):
    result = parity[case]
    assert result["params_loaded"] == result["params_total"]  # every Megatron parameter came from HF
    assert result["shape"][0] == 24
    assert result["logit_scale"] > 0.1  # a real signal, not all-zero logits
    assert result["max_abs_diff"] <= 1e-5, result
