"""Megatron → HF export: TP/EP/PP gathering in real gloo processes vs the unsharded model."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from luspo_megatron.parallel.export import ExportGroups, export_hf_weights, global_name

TP, PP, EP = 2, 2, 2  # 4 ranks; EP spans the TP ranks of a stage (expert TP = 1), as Megatron folds it
LAYERS, EXPERTS, H, FFN_EXPERT, FFN_SHARED, V = 4, 4, 4, 3, 6, 10


def full_model() -> dict[str, tuple[torch.Tensor, int | None, bool, bool]]:
    """Global name -> (full tensor, TP dim, expert, glu), the TP=PP=EP=1 model the shards come from."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g)
    model = {"embedding.word_embeddings.weight": (rand(V, H), 0, False, False)}
    for layer in range(LAYERS):
        p = f"decoder.layers.{layer}."
        model[p + "input_layernorm.weight"] = (rand(H), None, False, False)
        model[p + "self_attention.linear_qkv.weight"] = (rand(12, H), 0, False, False)
        model[p + "self_attention.linear_proj.weight"] = (rand(H, 8), 1, False, False)
        model[p + "mlp.router.weight"] = (rand(EXPERTS, H), None, False, False)
        model[p + "mlp.shared_experts.linear_fc1.weight"] = (rand(2 * FFN_SHARED, H), 0, False, True)
        for e in range(EXPERTS):
            model[p + f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = (rand(2 * FFN_EXPERT, H), None, True, False)
            model[p + f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = (rand(H, FFN_EXPERT), None, True, False)
    model["decoder.final_layernorm.weight"] = (rand(H), None, False, False)
    model["output_layer.weight"] = (rand(V, H), 0, False, False)
    return model


def name_map(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """A stand-in for models/hf_map.py: splits fused tensors, renames the rest."""
    hf = name.replace("decoder.layers.", "model.layers.").replace("embedding.word_embeddings", "model.embed_tokens")
    if name.endswith("linear_qkv.weight"):
        q, k, v = tensor.split([6, 3, 3])
        base = hf.removesuffix("linear_qkv.weight")
        return [(base + "q_proj.weight", q), (base + "k_proj.weight", k), (base + "v_proj.weight", v)]
    if name.endswith("linear_fc1.weight"):
        gate, up = tensor.chunk(2)
        base = hf.removesuffix("linear_fc1.weight")
        return [(base + "gate_proj.weight", gate), (base + "up_proj.weight", up)]
    return [(hf, tensor)]


def local_shard(full: torch.Tensor, tp_dim: int | None, glu: bool, tp_rank: int) -> torch.Tensor:
    if tp_dim is None:
        return full.clone()
    if glu:  # Megatron's layout: each rank holds [gate_r; up_r]
        gate, up = full.chunk(2)
        return torch.cat([gate.chunk(TP)[tp_rank], up.chunk(TP)[tp_rank]])
    return full.chunk(TP, dim=tp_dim)[tp_rank].clone()


def local_params(rank: int) -> list[tuple[str, torch.nn.Parameter]]:
    """What ``named_parameters()`` of this rank's model chunk would hold, with Megatron's attributes."""
    tp_rank, stage = rank % TP, rank // TP
    ep_rank, per_stage, local_experts = tp_rank, LAYERS // PP, EXPERTS // EP
    params = []
    for name, (full, tp_dim, expert, glu) in full_model().items():
        first_only, last_only = name.startswith("embedding"), name.startswith(("output", "decoder.final"))
        if first_only and stage != 0 or last_only and stage != PP - 1:
            continue
        local_name = name
        if name.startswith("decoder.layers."):
            layer = int(name.split(".")[2])
            if layer // per_stage != stage:
                continue
            local_name = name.replace(f"layers.{layer}.", f"layers.{layer - stage * per_stage}.", 1)
        if expert:
            e = int(name.split("local_experts.")[1].split(".")[0])
            if e // local_experts != ep_rank:
                continue
            local_name = local_name.replace(f"local_experts.{e}.", f"local_experts.{e - ep_rank * local_experts}.")
        param = torch.nn.Parameter(local_shard(full, tp_dim, glu, tp_rank), requires_grad=False)
        if tp_dim is not None:
            param.tensor_model_parallel, param.partition_dim = True, tp_dim
        if expert:
            param.allreduce = False
        params.append((local_name, param))
    return params


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    groups = {}
    for kind, members in (("tp", [[0, 1], [2, 3]]), ("pp", [[0, 2], [1, 3]])):
        for ranks in members:  # every rank creates every group, in the same order
            group = dist.new_group(ranks)
            if rank in ranks:
                groups[kind] = group
    export = ExportGroups(tp=groups["tp"], ep=groups["tp"], etp=None, pp=groups["pp"],
                          num_local_experts=EXPERTS // EP, layer_offset=(rank // TP) * (LAYERS // PP))
    stream = list(export_hf_weights(local_params(rank), export, name_map))
    torch.save(stream, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_export_gathers_tp_ep_pp_into_the_unsharded_model(tmp_path):
    world = TP * PP
    # fork: the workers start from this process's imports (a spawn re-imports torch 4 times).
    mp.start_processes(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world,
                       start_method="fork")
    expected = {}
    for name, (full, *_rest) in full_model().items():
        for hf_name, tensor in name_map(name, full):
            expected[hf_name] = tensor
    for rank in range(world):
        stream = torch.load(tmp_path / f"rank{rank}.pt")
        names = [n for n, _ in stream]
        assert len(names) == len(set(names)) == len(expected), f"rank {rank}: a tensor is missing or repeated"
        for name, tensor in stream:
            assert torch.equal(tensor, expected[name]), f"rank {rank}: {name} differs from the unsharded model"


def test_global_name_renumbers_layers_and_both_expert_layouts():
    assert global_name("decoder.layers.1.mlp.experts.local_experts.2.linear_fc1.weight", 10, 6) == \
        "decoder.layers.11.mlp.experts.local_experts.8.linear_fc1.weight"
    assert global_name("decoder.layers.0.mlp.experts.linear_fc2.weight3", 4, 8) == \
        "decoder.layers.4.mlp.experts.linear_fc2.weight11"
    assert global_name("decoder.layers.2.self_attention.linear_qkv.weight", 5, 99) == \
        "decoder.layers.7.self_attention.linear_qkv.weight"
    assert global_name("output_layer.weight", 5, 3) == "output_layer.weight"
