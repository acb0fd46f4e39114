"""Megatron → Hugging Face weight export: the one exporter behind every weight sync and HF writer.

    for hf_name, tensor in export_policy_weights(chunks, arch, naming):   # collective, every rank
        ...

:func:`export_policy_weights` streams the policy as ``(hf_name, full tensor)`` pairs. It gathers
tensor-parallel shards, expert-parallel experts and pipeline stages with plain torch.distributed
collectives (nothing pickled but a tensor's name, shape and dtype), and hands each *full* Megatron
tensor to the model's name map (``models/hf_map.py::hf_name_map``). Memory: one full tensor at a
time, plus what the consumer keeps (``rollout/weight_sync.py::bucket_by_bytes``). A yielded tensor
may share storage with a parameter: copy what you keep past the next optimizer step.

The core, :func:`export_hf_weights`, reads only what Megatron-Core sets on its parameters:

``name_map(megatron_name, full_tensor) -> [(hf_name, tensor), ...]``
    ``megatron_name`` is the name a TP=PP=EP=1 model would have: global layer index
    (``decoder.layers.{global_layer}.``), global expert index (``mlp.experts.local_experts.{e}.`` or
    ``mlp.experts.linear_fc1.weight{e}``), ``embedding.word_embeddings.weight``,
    ``output_layer.weight``. ``full_tensor`` is unsharded, with Megatron's layout (fused
    ``linear_qkv`` in query-group order, GLU ``linear_fc1`` as ``[gate; up]``). Return the HF tensors
    (e.g. q/k/v, gate_proj/up_proj); return ``[]`` to skip a tensor (e.g. ``_extra_state``).
:class:`ExportGroups`
    The process groups of this rank (``None`` where that parallelism is 1) and the PP facts:
    ``tp``, ``ep``, ``etp`` and ``pp`` groups, ``num_local_experts`` = experts per EP rank,
    ``layer_offset`` = the global index of the chunk's first layer.
``named_params``
    ``named_parameters()`` of one unwrapped model chunk (no ``module.`` DDP prefix). Megatron-Core
    marks TP-sharded parameters with ``tensor_model_parallel=True`` and ``partition_dim``, and
    expert parameters with ``allreduce=False``; :func:`megatron_shard_info` reads those.

Collective contract: every rank of the model-parallel groups iterates the stream to the end, in
lockstep (each step is a collective). Every rank sees the full model; the rank that talks to the
engines uses it, the others drain it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

NameMap = Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]]


@dataclass(frozen=True)
class ShardInfo:
    """How a local parameter relates to its full tensor.

    ``tp_dim``: the dim split across the (expert-)TP group, None if replicated. ``expert``: an
    expert weight (TP group = expert-TP group; one copy per EP rank holds different experts).
    ``glu``: Megatron's fused gated fc1, where each TP shard is ``[gate_r; up_r]`` along dim 0, so
    the full tensor is ``[gate_0 … gate_{n-1}; up_0 … up_{n-1}]``, not a plain concatenation.
    """

    tp_dim: int | None = None
    expert: bool = False
    glu: bool = False


@dataclass
class ExportGroups:
    """This rank's process groups (None = size 1) and its pipeline stage's layer offset."""

    tp: dist.ProcessGroup | None = None
    ep: dist.ProcessGroup | None = None
    etp: dist.ProcessGroup | None = None
    pp: dist.ProcessGroup | None = None
    num_local_experts: int = 0
    layer_offset: int = 0
    gated_linear_unit: bool = True


def megatron_shard_info(name: str, param: torch.Tensor, gated_linear_unit: bool = True) -> ShardInfo:
    """Read Megatron-Core's parameter attributes (set by its parallel linear layers)."""
    sharded = bool(getattr(param, "tensor_model_parallel", False))
    tp_dim = int(getattr(param, "partition_dim", 0)) if sharded else None
    expert = not getattr(param, "allreduce", True) or ".experts." in name
    glu = gated_linear_unit and sharded and "linear_fc1" in name
    return ShardInfo(tp_dim=tp_dim, expert=expert, glu=glu)


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"(\.local_experts\.)(\d+)(\.)")
_GROUPED_EXPERT = re.compile(r"(\.experts\.linear_fc[12]\.(?:weight|bias))(\d+)$")


def global_name(name: str, layer_offset: int, expert_offset: int) -> str:
    """Local (stage, EP rank) name -> the name in a TP=PP=EP=1 model."""
    name = _LAYER.sub(lambda m: m.group(0).replace(m.group(1), str(int(m.group(1)) + layer_offset), 1), name, 1)
    name = _LOCAL_EXPERT.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + expert_offset}{m.group(3)}", name)
    return _GROUPED_EXPERT.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + expert_offset}", name)


def _size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_gather(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> list[torch.Tensor]:
    if _size(group) == 1:
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def _gather_tp(tensor: torch.Tensor, info: ShardInfo, group: dist.ProcessGroup | None) -> torch.Tensor:
    if info.tp_dim is None or _size(group) == 1:
        return tensor
    parts = _all_gather(tensor, group)
    if info.glu:  # each shard is [gate_r; up_r]: regroup all gates, then all ups
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=info.tp_dim)


def _stage_tensors(
    named_params: Iterable[tuple[str, torch.Tensor]], groups: ExportGroups,
    shard_info: Callable[[str, torch.Tensor], ShardInfo],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Full tensors of this PP stage, with global names (collectives over TP, ETP and EP)."""
    for name, param in named_params:
        info = shard_info(name, param)
        tensor = param.detach()
        if not info.expert:
            yield global_name(name, groups.layer_offset, 0), _gather_tp(tensor, info, groups.tp)
            continue
        full = _gather_tp(tensor, info, groups.etp)
        # EP rank r holds experts r·L … r·L + L − 1 under local indices 0 … L − 1.
        # Every EP rank yields every expert, in EP-rank order.
        for r, part in enumerate(_all_gather(full, groups.ep)):
            yield global_name(name, groups.layer_offset, r * groups.num_local_experts), part


def export_hf_weights(
    named_params: Iterable[tuple[str, torch.Tensor]], groups: ExportGroups, name_map: NameMap,
    shard_info: Callable[[str, torch.Tensor], ShardInfo] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream the whole model as HF ``(name, tensor)`` pairs, stage after stage (module docstring).

    Each pipeline stage gathers its tensors (TP, EP), then broadcasts them over the PP group, so
    every rank yields the same sequence. Memory: one full tensor at a time, plus the caller's bucket.
    """
    if shard_info is None:
        def shard_info(name: str, param: torch.Tensor) -> ShardInfo:
            return megatron_shard_info(name, param, groups.gated_linear_unit)
    named_params = list(named_params)
    pp_size = _size(groups.pp)
    if pp_size == 1:
        for name, tensor in _stage_tensors(named_params, groups, shard_info):
            yield from name_map(name, tensor)
        return
    my_stage = dist.get_rank(groups.pp)
    for stage in range(pp_size):
        src = dist.get_global_rank(groups.pp, stage)
        local = _stage_tensors(named_params, groups, shard_info) if stage == my_stage else None
        # The owning stage announces how many full tensors it has, then for each one its
        # (name, shape, dtype) and the data. It gathers lazily: one full tensor in memory at a time.
        count = [sum(1 for _ in _expanded_names(named_params, groups, shard_info))] if local is not None else [None]
        dist.broadcast_object_list(count, src=src, group=groups.pp)
        for _ in range(count[0]):
            if local is not None:
                name, tensor = next(local)
                meta = [(name, tuple(tensor.shape), tensor.dtype)]
            else:
                meta = [None]
            dist.broadcast_object_list(meta, src=src, group=groups.pp)
            name, shape, dtype = meta[0]
            buffer = tensor.contiguous() if local is not None else torch.empty(shape, dtype=dtype)
            dist.broadcast(buffer, src=src, group=groups.pp)
            yield from name_map(name, buffer)


def _expanded_names(named_params, groups: ExportGroups, shard_info) -> Iterator[str]:
    """How many full tensors this stage yields (an expert parameter yields one per EP rank)."""
    ep = _size(groups.ep)
    for name, param in named_params:
        yield from [name] * (ep if shard_info(name, param).expert else 1)


def chunk_export_groups(chunk: torch.nn.Module) -> ExportGroups:
    """The :class:`ExportGroups` of one unwrapped ``GPTModel`` chunk on this rank (megatron's
    ``parallel_state``; a group of size 1 is None)."""
    from megatron.core import parallel_state as ps

    def group(size: int, get) -> dist.ProcessGroup | None:
        return get() if size > 1 else None

    experts = [getattr(layer.mlp, "experts", None) for layer in chunk.decoder.layers]
    experts = [e for e in experts if e is not None]
    return ExportGroups(
        tp=group(ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_group),
        ep=group(ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_group),
        etp=group(ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_group),
        pp=group(ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_group),
        num_local_experts=experts[0].num_local_experts if experts else 0,
        layer_offset=chunk.decoder.layers[0].layer_number - 1 if len(chunk.decoder.layers) else 0,
        gated_linear_unit=chunk.config.gated_linear_unit,
    )


def export_policy_weights(chunks: list[torch.nn.Module], name_map: NameMap) -> Iterator[tuple[str, torch.Tensor]]:
    """The whole policy as HF ``(name, tensor)`` pairs on every rank (collective), chunk after chunk
    (VPP: every stage holds as many chunks, each exported with its own layer offset).
    ``chunks``: this rank's unwrapped ``GPTModel`` chunks; ``name_map``: ``models.hf_map.hf_name_map``."""
    for chunk in chunks:
        yield from export_hf_weights(chunk.named_parameters(), chunk_export_groups(chunk), name_map)
