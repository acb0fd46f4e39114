"""Grouped-GEMM experts (models/experts.py) equal megatron's SequentialMLP, in real MoELayers and
GPTModels under real gloo processes: ep2, tp2 with etp1, tp2 with etp2, and dp2 (ep1).

The oracle is megatron's own SequentialMLP with the same weights and routing. In float64 the grouped
experts run their loop backend (torch grouped_mm has no float64), the same per-expert products, so
outputs and every gradient must agree exactly; in float32 they run the torch grouped_mm kernel and
must agree with the float64 sequential result to float32 precision. See grouped_experts_worker.py.
"""

from pathlib import Path

import pytest
import torch

from tests.distributed import run_worker

WORKER = Path(__file__).with_name("grouped_experts_worker.py")
MOE_LAYOUTS = ["ep1", "ep2", "tp2etp1", "tp2etp2"]
MODEL_LAYOUTS = ["ep2", "tp2etp1"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("grouped")
    return run_worker(WORKER, 2, work / "out.pt", ["--layouts", ",".join(MOE_LAYOUTS), "--model-layouts",
                                                   ",".join(MODEL_LAYOUTS), "--work", str(work)], timeout=600)


def _entries(results, layout):
    return [rank[layout] for rank in results["moe"]]


@pytest.mark.parametrize("layout", MOE_LAYOUTS)
def test_grouped_experts_equal_sequential_mlp_exactly_in_float64(results, layout):
    for entry in _entries(results, layout):
        assert entry["stacked"]  # the forward read the shared buffers (no copy)
        for routing, r in entry["routings"].items():
            f64 = r["float64"]
            assert f64["num_grads"] in (9, 17)  # router + every local expert's fc1 and fc2
            assert f64["out"] == 0.0 and f64["dx"] == 0.0 and f64["grads"] == 0.0, (layout, routing, f64)


@pytest.mark.parametrize("layout", MOE_LAYOUTS)
def test_grouped_mm_kernel_matches_float64_sequential_to_float32_precision(results, layout):
    for entry in _entries(results, layout):
        for routing, r in entry["routings"].items():
            f32 = r["float32_kernel"]
            assert f32["out"] < 1e-5 and f32["dx"] < 1e-5 and f32["grads"] < 1e-5, (layout, routing, f32)


@pytest.mark.parametrize("layout", MOE_LAYOUTS)
def test_experts_without_tokens_get_zero_gradients_like_sequential(results, layout):
    for rank, entry in enumerate(_entries(results, layout)):
        mixed, first_two = entry["routings"]["mixed"], entry["routings"]["first_two"]
        assert mixed["routed_counts"][3] == mixed["routed_counts"][6] == 0  # the routing did leave experts out
        assert mixed["float64"]["zero_expert_grads"] >= 2
        local = 4 if layout == "ep2" else 8
        if layout == "ep2" and rank == 1:  # experts 4-7: no token at all reaches this rank's experts module
            assert first_two["float64"]["zero_expert_grads"] == 2 * local
        assert entry["zero_tokens"]["grouped"] == entry["zero_tokens"]["sequential"] == ((0, 64), True)


@pytest.mark.parametrize("layout", MODEL_LAYOUTS)
def test_conversion_round_trip_and_export_with_grouped_experts_are_bit_identical(results, layout):
    entry = results["model"][layout]
    assert entry["grouped_modules"] == 4 and entry["stacked"]
    assert entry["same_params"]  # loaded from the converted checkpoint: identical names and values
    assert entry["logits_rel"] < 1e-6
    assert entry["export_sequential_exact"] and entry["export_grouped_exact"]  # weight export (gather)
    assert entry["export_rc"] == 0 and entry["round_trip_exact"]  # saved by the grouped model, back to HF
    assert entry["num_tensors"] > 100


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it)")
def test_cuda_bf16_grouped_kernel_is_as_accurate_as_sequential_and_zeroes_empty_experts(tmp_path):
    r = run_worker(WORKER, 1, tmp_path / "cuda.pt", ["--device", "cuda"], timeout=600)
    assert r["stacked"] and r["model_stacked"][1] and r["model_stacked"][2] == "cuda"
    for routing, entry in r["routings"].items():
        grouped, sequential = entry["bf16_kernel"], entry["bf16_sequential"]
        for key in ("out", "dx", "grads"):  # bf16 rounding, no worse than megatron's own bf16 experts
            assert grouped[key] < max(3e-2, 2 * sequential[key]), (routing, key, grouped, sequential)
        assert grouped["zero_expert_grads"] == sequential["zero_expert_grads"] > 0  # exactly zero, not garbage
    assert r["zero_tokens"]["grouped"] == r["zero_tokens"]["sequential"] == ((0, 64), True)
