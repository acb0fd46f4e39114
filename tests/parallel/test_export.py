"""Megatron → HF export, sharded: real gloo processes holding Megatron-style shards (plain tensors
with Megatron's parameter attributes), against the unsharded model they were cut from.

Property: the union of what the ranks yield is the unsharded model bit for bit, every tensor
exactly once, and a rank that owns nothing yields nothing. The real model and name map are
checked by ``export_worker.py`` (test_export_real.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from luspo_megatron.parallel.export import ExportGroups, export_hf_weights, global_name

LAYERS, EXPERTS, H, FFN_EXPERT, FFN_SHARED, V = 4, 4, 4, 3, 6, 10


@dataclass(frozen=True)
class Layout:
    """Megatron's rank order: dense rank = tp + TP·(dp + DP·pp); expert rank = etp + ETP·(ep + EP·edp)
    inside a stage. EDP is what is left of a stage for the experts."""

    tp: int
    pp: int
    dp: int
    ep: int
    etp: int

    @property
    def world(self) -> int:
        return self.tp * self.dp * self.pp

    @property
    def edp(self) -> int:
        return self.tp * self.dp // (self.ep * self.etp)

    def coords(self, rank: int) -> dict[str, int]:
        stage, local = divmod(rank, self.tp * self.dp)
        return {"pp": stage, "tp": local % self.tp, "dp": local // self.tp, "etp": local % self.etp,
                "ep": local // self.etp % self.ep, "edp": local // (self.etp * self.ep)}

    def groups(self, kind: str) -> list[list[int]]:
        """Rank lists of every TP (kind "tp") or expert-TP ("etp") group."""
        same = {"tp": ("pp", "dp"), "etp": ("pp", "ep", "edp")}[kind]  # what the members share
        out: dict[tuple, list[int]] = {}
        for rank in range(self.world):
            c = self.coords(rank)
            out.setdefault(tuple(c[k] for k in same), []).append(rank)
        return list(out.values())


LAYOUTS = {
    "tp2pp2ep2": Layout(tp=2, pp=2, dp=1, ep=2, etp=1),  # EP spans the TP ranks of a stage, as Megatron folds it
    "tp2dp2ep2": Layout(tp=2, pp=1, dp=2, ep=2, etp=1),  # dense and expert replicas: ranks 2, 3 own nothing
    "tp2dp2etp2": Layout(tp=2, pp=1, dp=2, ep=1, etp=2),  # experts TP-sharded over their own group
}


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
            model[p + f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = (rand(2 * 2 * FFN_EXPERT, H), 0, True, True)
            model[p + f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = (rand(H, 2 * FFN_EXPERT), 1, True, False)
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


def local_shard(full: torch.Tensor, tp_dim: int | None, glu: bool, n: int, r: int) -> torch.Tensor:
    if tp_dim is None or n == 1:
        return full.clone()
    if glu:  # Megatron's layout: each rank holds [gate_r; up_r]
        gate, up = full.chunk(2)
        return torch.cat([gate.chunk(n)[r], up.chunk(n)[r]])
    return full.chunk(n, dim=tp_dim)[r].clone()


def local_params(layout: Layout, rank: int) -> list[tuple[str, torch.nn.Parameter]]:
    """What ``named_parameters()`` of this rank's model chunk would hold, with Megatron's attributes."""
    c = layout.coords(rank)
    per_stage, local_experts = LAYERS // layout.pp, EXPERTS // layout.ep
    params = []
    for name, (full, tp_dim, expert, glu) in full_model().items():
        first_only, last_only = name.startswith("embedding"), name.startswith(("output", "decoder.final"))
        if first_only and c["pp"] != 0 or last_only and c["pp"] != layout.pp - 1:
            continue
        local_name = name
        if name.startswith("decoder.layers."):
            layer = int(name.split(".")[2])
            if layer // per_stage != c["pp"]:
                continue
            local_name = name.replace(f"layers.{layer}.", f"layers.{layer - c['pp'] * per_stage}.", 1)
        n, r = (layout.etp, c["etp"]) if expert else (layout.tp, c["tp"])
        if expert:
            e = int(name.split("local_experts.")[1].split(".")[0])
            if e // local_experts != c["ep"]:
                continue
            local_name = local_name.replace(f"local_experts.{e}.", f"local_experts.{e - c['ep'] * local_experts}.")
        param = torch.nn.Parameter(local_shard(full, tp_dim, glu, n, r), requires_grad=False)
        if tp_dim is not None and n > 1:
            param.tensor_model_parallel, param.partition_dim = True, tp_dim
        if expert:
            param.allreduce = False
        params.append((local_name, param))
    return params


def _worker(rank: int, layout: Layout, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=layout.world)
    mine = {}
    for kind in ("tp", "etp"):
        for ranks in layout.groups(kind):  # every rank creates every group, in the same order
            group = dist.new_group(ranks) if len(ranks) > 1 else None
            if rank in ranks:
                mine[kind] = group
    c = layout.coords(rank)
    export = ExportGroups(
        tp=mine["tp"], etp=mine["etp"], dense_exported=c["dp"] == 0, owns_dense=c["dp"] == 0 and c["tp"] == 0,
        experts_exported=c["edp"] == 0, owns_experts=c["edp"] == 0 and c["etp"] == 0, ep_rank=c["ep"],
        num_local_experts=EXPERTS // layout.ep, layer_offset=c["pp"] * (LAYERS // layout.pp))
    stream = [(n, t.clone()) for n, t in export_hf_weights(local_params(layout, rank), export, name_map)]
    torch.save(stream, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", LAYOUTS)
def test_owners_yield_the_unsharded_model_once_and_the_others_nothing(name, tmp_path):
    layout = LAYOUTS[name]
    # fork: the workers start from this process's imports (a spawn re-imports torch 4 times).
    mp.start_processes(_worker, args=(layout, str(tmp_path / "init"), str(tmp_path)), nprocs=layout.world,
                       start_method="fork")
    expected = {}
    for megatron_name, (full, *_rest) in full_model().items():
        for hf_name, tensor in name_map(megatron_name, full):
            expected[hf_name] = tensor
    seen: dict[str, int] = {}
    for rank in range(layout.world):
        c = layout.coords(rank)
        stream = torch.load(tmp_path / f"rank{rank}.pt")
        owns = (c["dp"] == 0 and c["tp"] == 0) or (c["edp"] == 0 and c["etp"] == 0)
        assert bool(stream) == owns, f"rank {rank} {c}: owns={owns} but yielded {len(stream)} tensors"
        for hf_name, tensor in stream:
            assert hf_name not in seen, f"{hf_name} yielded by ranks {seen[hf_name]} and {rank}"
            seen[hf_name] = rank
            assert torch.equal(tensor, expected[hf_name]), f"rank {rank}: {hf_name} differs from the unsharded model"
            is_expert = ".experts." in hf_name and "shared" not in hf_name
            assert (c["edp"] == 0 and c["etp"] == 0) if is_expert else (c["dp"] == 0 and c["tp"] == 0)
    assert seen.keys() == expected.keys(), f"missing: {sorted(expected.keys() - seen.keys())[:5]}"


def test_global_name_renumbers_layers_and_both_expert_layouts():
    assert global_name("decoder.layers.1.mlp.experts.local_experts.2.linear_fc1.weight", 10, 6) == \
        "decoder.layers.11.mlp.experts.local_experts.8.linear_fc1.weight"
    assert global_name("decoder.layers.0.mlp.experts.linear_fc2.weight3", 4, 8) == \
        "decoder.layers.4.mlp.experts.linear_fc2.weight11"
    assert global_name("decoder.layers.2.self_attention.linear_qkv.weight", 5, 99) == \
        "decoder.layers.7.self_attention.linear_qkv.weight"
    assert global_name("output_layer.weight", 5, 3) == "output_layer.weight"
