"""The sharded exporter on the real Megatron model (export_worker.py, real gloo processes).

1. At every layout the union of what the ranks yield is the Hugging Face state dict the model was
   loaded from, bit for bit, every tensor exactly once; a rank that megatron's parallel_state says
   owns nothing yields nothing, and a rank yields expert (dense) tensors only if it owns experts
   (dense tensors). The oracle is the transformers model itself, rebuilt here.
2. The memory bound: on every rank, the peak extra memory of an export, bucketed and written as
   this rank's shards (the disk sync's per-rank work) is at most two buckets plus twice the largest
   gathered tensor (one for the tensor being gathered or split into its HF parts, one for the
   tensor waiting to open the next bucket), plus 512 KiB for the interpreter and the kernel
   counter's granularity, on a model of many buckets (24 MiB, 48 buckets). The disk path may add
   safetensors' write buffer, measured alone. Measured by the kernel's resident-set high-water
   mark (luspo_megatron/runtime/memory.py says why that is honest); the negative control keeps
   every exported tensor and must exceed it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from luspo_megatron.runtime.memory import MMAP_THRESHOLD_ENV
from tests.distributed import torchrun

WORKER = Path(__file__).with_name("export_worker.py")
FAST = ["tp2", "ep2", "pp2", "pp2vpp2", "dp2", "pp2-tied", "tp2-tied"]
SLOW = ["tp2pp2ep2etp1", "tp2dp2ep2etp1"]
MEMORY = ["tp2", "ep2"]
BUCKET = 512 * 1024
SLACK = 512 * 1024


def run(out: Path, nproc: int, layouts: list[str], memory: list[str] = ()) -> list[dict]:
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ.update(MMAP_THRESHOLD_ENV)  # runtime/memory.py: blocks mapped on their own, returned when freed
    try:
        torchrun(WORKER, nproc, ["--out", str(out), "--layouts", ",".join(layouts), "--memory-layouts",
                                 ",".join(memory), "--bucket-bytes", str(BUCKET)], timeout=600)
    finally:
        if saved is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_")
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    return [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(nproc)]


@pytest.fixture(scope="module")
def two_process(tmp_path_factory):
    return run(tmp_path_factory.mktemp("export") / "two", 2, FAST, MEMORY)


@pytest.fixture(scope="module")
def four_process(tmp_path_factory):
    return run(tmp_path_factory.mktemp("export") / "four", 4, SLOW)


def expected_state_dict(layout: str) -> dict[str, torch.Tensor]:
    from luspo_megatron.models import tiny_qwen3, tiny_qwen3_moe
    from luspo_megatron.models.hf_map import hf_live_to_disk
    from tests.hf_models import build_hf_model
    from tests.parallel.export_worker import VOCAB

    config = (tiny_qwen3 if layout.endswith("-tied") else tiny_qwen3_moe)(vocab_size=VOCAB)
    return hf_live_to_disk(build_hf_model(config, seed=3).state_dict(), config["tie_word_embeddings"])


def check_union(ranks: list[dict], layout: str) -> None:
    expected = expected_state_dict(layout)
    seen: dict[str, int] = {}
    for rank, result in enumerate(ranks):
        share, owns = result["export"][layout]["own"], result["export"][layout]["owns"]
        if not (owns["dense"] or owns["experts"]):
            assert not share, f"rank {rank} owns nothing but yielded {sorted(share)[:3]}"
        for name, tensor in share.items():
            assert name not in seen, f"{name} yielded by ranks {seen[name]} and {rank}"
            seen[name] = rank
            expert = ".mlp.experts." in name
            assert owns["experts"] if expert else owns["dense"], f"rank {rank} {owns} yielded {name}"
            assert name in expected, f"rank {rank} yielded {name}, which the HF model does not have"
            assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), \
                f"{layout}: {name} from rank {rank} differs from the HF weights"
    assert seen.keys() == expected.keys(), f"{layout}: missing {sorted(expected.keys() - seen.keys())[:5]}"


@pytest.mark.parametrize("layout", FAST)
def test_owners_export_the_hf_model_exactly_once_and_the_others_nothing(two_process, layout):
    check_union(two_process, layout)
    if layout in ("tp2", "dp2"):  # rank 1 holds a TP shard / a replica: it sends or is sent nothing
        assert not two_process[1]["export"][layout]["own"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", SLOW)
def test_four_process_layouts_export_the_hf_model_exactly_once(four_process, layout):
    check_union(four_process, layout)


@pytest.mark.parametrize("layout", MEMORY)
def test_peak_extra_memory_of_a_sync_is_two_buckets_and_the_largest_tensor(two_process, layout):
    for rank, result in enumerate(two_process):
        m = result["memory"][layout]
        assert m["mmap_threshold_set"] and m["disk_error"] is None
        assert m["model_bytes"] >= 40 * BUCKET, m  # many buckets
        bound = 2 * m["bucket_bytes"] + 2 * m["largest"] + SLACK
        assert 3 * bound < m["model_bytes"], m  # the bound is far from the whole model
        if m["export_bytes"]:
            assert m["disk_written"] >= m["export_bytes"] and m["disk_tensors"] > 0
            # The meter sees memory that is really held: keeping the whole share shows up in full.
            assert m["keep_all"] >= 0.9 * m["export_bytes"], m
        assert m["buckets"] <= bound, f"rank {rank}: {m}"
        # The disk path adds safetensors' write buffer (measured alone: about one bucket here,
        # at most about 1 MiB for any bucket size).
        assert m["writer"] <= max(m["bucket_bytes"], 1024**2) + SLACK, m
        assert m["disk"] <= bound + m["writer"], f"rank {rank}: {m}"
    # The every-rank exporter made each rank hold the whole model: far above the bound.
    assert max(r["memory"][layout]["keep_all"] for r in two_process) > 3 * (2 * BUCKET + 2 * max(
        r["memory"][layout]["largest"] for r in two_process) + SLACK)
