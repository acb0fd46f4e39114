"""Worker (torchrun): the sharded exporter on the real Megatron model, layout after layout.

For each ``--layouts`` entry (same processes, groups rebuilt in between): load explicit HF weights
(a tiny model built in transformers, seed 3) into this rank's chunks, export, and save what this
rank yielded plus whether megatron's parallel_state says it owns dense / expert tensors. The test
rebuilds the HF state dict itself and checks the union.

``--memory-layouts``: the same model at those layouts, with the peak extra memory of one export
(runtime/memory.py) measured three ways on every rank: the export cut into buckets, each dropped
before the next is built (the shape of every transport), the real disk push (rollout/push.py
writing this rank's shards), and a negative control that keeps every exported tensor (what the
every-rank exporter did); plus safetensors' own write buffer for one bucket. Run with
MALLOC_MMAP_THRESHOLD_ set (the test does).

Layout names: tp2 ep2 pp2 pp2vpp2 dp2 cp2, a "-tied" suffix for the dense Qwen3 (tied embeddings),
and 4-process ones such as tp2pp2ep2etp1.
"""

import argparse
import re
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

VOCAB = 256
# The memory layouts widen the experts (hidden, layers and experts stay tiny) so that every tensor is
# large against the resident-set counter's granularity (tens of KiB) and the model is many buckets.
WIDE_EXPERTS = {"moe_intermediate_size": 1024}


def parse_layout(name: str) -> dict:
    sizes = {k: int(v) for k, v in re.findall(r"(etp|tp|pp|vpp|cp|ep|dp)(\d+)", name.removesuffix("-tied"))}
    return {
        "tensor_model_parallel_size": sizes.get("tp", 1), "pipeline_model_parallel_size": sizes.get("pp", 1),
        "virtual_pipeline_model_parallel_size": sizes.get("vpp"), "context_parallel_size": sizes.get("cp", 1),
        "expert_model_parallel_size": sizes.get("ep", 1), "expert_tensor_parallel_size": sizes.get("etp"),
    }


def build(name: str, **overrides):
    """This rank's chunks of the layout, loaded with the seed-3 HF weights."""
    from luspo_megatron.config import ParallelConfig
    from luspo_megatron.models import arch_from_hf, tiny_qwen3, tiny_qwen3_moe
    from luspo_megatron.models.build import build_model
    from luspo_megatron.models.hf_map import hf_live_to_disk
    from luspo_megatron.models.megatron_config import transformer_config
    from luspo_megatron.models.weights import load_hf_weights
    from luspo_megatron.parallel.state import init_parallel
    from tests.hf_models import build_hf_model

    hf_config = (tiny_qwen3 if name.endswith("-tied") else tiny_qwen3_moe)(vocab_size=VOCAB, **overrides)
    arch = arch_from_hf(hf_config)
    parallel = ParallelConfig(**parse_layout(name))
    init_parallel(parallel, arch, seed=5)
    chunks = build_model(arch, transformer_config(arch, parallel), use_transformer_engine=False)
    load_hf_weights(chunks, arch, hf_live_to_disk(build_hf_model(hf_config, seed=3).state_dict(),
                                                  arch.tie_word_embeddings))
    return arch, chunks


def ownership() -> dict:
    from megatron.core import parallel_state as ps

    dense_replica = ps.get_data_parallel_rank(with_context_parallel=True)
    return {
        "dense": dense_replica == 0 and ps.get_tensor_model_parallel_rank() == 0,
        "experts": ps.get_expert_data_parallel_rank() == 0 and ps.get_expert_tensor_parallel_rank() == 0,
    }


def export_layout(name: str) -> dict:
    from luspo_megatron.models.hf_map import hf_name_map
    from luspo_megatron.parallel.export import export_policy_weights

    arch, chunks = build(name)
    own = {k: v.clone() for k, v in export_policy_weights(chunks, hf_name_map(arch))}
    return {"own": own, "owns": ownership()}


def largest_gathered(chunks) -> int:
    """Bytes of the largest full (gathered) Megatron tensor among this rank's parameters."""
    from megatron.core import parallel_state as ps

    biggest = 0
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            expert = ".experts." in name
            n = (ps.get_expert_tensor_parallel_world_size() if expert else ps.get_tensor_model_parallel_world_size())
            biggest = max(biggest, p.numel() * p.element_size() * (n if getattr(p, "tensor_model_parallel", False)
                                                                    else 1))
    return biggest


def memory_layout(name: str, bucket_bytes: int) -> dict:
    from safetensors.torch import save_file

    from luspo_megatron.models.hf_map import hf_name_map
    from luspo_megatron.parallel.export import export_policy_weights
    from luspo_megatron.rollout.push import ShardPusher
    from luspo_megatron.rollout.sync_plan import SyncPlan
    from luspo_megatron.rollout.weight_sync import bucket_by_bytes
    from luspo_megatron.runtime.memory import PeakMemory, mmap_threshold_set

    arch, chunks = build(name, **WIDE_EXPERTS)
    name_map = hf_name_map(arch)

    def export():
        return export_policy_weights(chunks, name_map)

    export_bytes = sum(t.numel() * t.element_size() for _, t in export())  # warm-up too
    with PeakMemory(cuda=False) as buckets:
        for bucket in bucket_by_bytes(export(), bucket_bytes):
            del bucket  # a transport's shape: each bucket used, then dropped before the next is built
    with tempfile.TemporaryDirectory() as stage:
        plan = SyncPlan("disk", "1", 1, (), bucket_bytes=bucket_bytes, stage_dir=stage)
        with PeakMemory(cuda=False) as disk:
            report = ShardPusher(dist.get_rank()).push(plan, export())
        written = sum(f.stat().st_size for f in Path(stage).iterdir())
    with tempfile.TemporaryDirectory() as scratch:  # safetensors' own write buffer, for one bucket
        sample = {f"t{i}": torch.randn(bucket_bytes // 16) for i in range(4)}
        with PeakMemory(cuda=False) as writer:
            save_file(sample, f"{scratch}/sample.safetensors")
        del sample
    with PeakMemory(cuda=False) as keep_all:
        everything = [(n, t.clone()) for n, t in export()]
        del everything
    model_bytes = torch.tensor([export_bytes], dtype=torch.float64)
    dist.all_reduce(model_bytes)
    return {"buckets": buckets.host_bytes, "disk": disk.host_bytes, "keep_all": keep_all.host_bytes,
            "writer": writer.host_bytes,
            "export_bytes": export_bytes, "model_bytes": int(model_bytes.item()), "largest": largest_gathered(chunks),
            "bucket_bytes": bucket_bytes, "disk_error": report.error, "disk_written": written,
            "disk_tensors": report.tensors, "mmap_threshold_set": mmap_threshold_set()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--layouts", default="")
    parser.add_argument("--memory-layouts", default="")
    parser.add_argument("--bucket-bytes", type=int, default=512 * 1024)
    args = parser.parse_args()
    from luspo_megatron.runtime.distributed import init_process_group

    init_process_group()
    result = {"export": {}, "memory": {}}
    for name in filter(None, args.layouts.split(",")):
        result["export"][name] = export_layout(name)
    for name in filter(None, args.memory_layouts.split(",")):
        result["memory"][name] = memory_layout(name, args.bucket_bytes)
    torch.save(result, f"{args.out}.rank{dist.get_rank()}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
