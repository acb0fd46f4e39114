"""Megatron → Hugging Face weight export: the one exporter behind every weight sync and HF writer.

    for hf_name, tensor in export_policy_weights(chunks, name_map):   # collective; every rank calls it
        ...                                                          # this rank's OWN tensors only

Sharded and streaming. Each rank yields only the ``(HF name, full tensor)`` pairs it owns:

- dense parameters: the rank with tensor-parallel rank 0 and data/context-parallel rank 0 of its
  pipeline stage, after gathering the TP shards onto it (``dist.gather`` inside the TP group);
- expert parameters: the rank with expert-TP rank 0 and expert-data-parallel rank 0 of each
  expert-parallel rank, after gathering inside the expert-TP group. Experts stay on their EP rank
  (no EP collective): EP rank r owns global experts r·L … r·L + L − 1.

So the union of what the owners yield is the whole model, each tensor exactly once, and no rank
ever holds more than one gathered tensor (plus the consumer's buckets). Nothing is pickled. The
other members of an owner's TP group send their shard and yield nothing; a TP group whose data- or
context-parallel rank is not 0 (a replica) does no collective at all. A yielded tensor may share
storage with a parameter: copy what you keep past the next optimizer step.

The core, :func:`export_hf_weights`, reads only what Megatron-Core sets on its parameters:

``name_map(megatron_name, full_tensor) -> [(hf_name, tensor), ...]``
    ``megatron_name`` is the name a TP=PP=EP=1 model would have: global layer index
    (``decoder.layers.{global_layer}.``), global expert index (``mlp.experts.local_experts.{e}.`` or
    ``mlp.experts.linear_fc1.weight{e}``, the TE name), ``embedding.word_embeddings.weight``,
    ``output_layer.weight``. ``full_tensor`` is unsharded, with Megatron's layout (fused
    ``linear_qkv`` in query-group order, GLU ``linear_fc1`` as ``[gate; up]``). Return the HF tensors
    (e.g. q/k/v, gate_proj/up_proj); return ``[]`` to skip a tensor (``_extra_state``, the last
    stage's copy of a tied embedding).
:class:`ExportGroups`
    This rank's (expert-)TP groups (``None`` where the size is 1), whether it owns dense / expert
    tensors, whether its TP groups export at all, its EP rank and the chunk's layer offset.
``named_params``
    ``named_parameters()`` of one unwrapped model chunk (no ``module.`` DDP prefix). Megatron-Core
    marks TP-sharded parameters with ``tensor_model_parallel=True`` and ``partition_dim``, and
    expert parameters with ``allreduce=False``; :func:`megatron_shard_info` reads those.

Collective contract: every rank iterates its stream to the end, in lockstep with the other ranks of
its TP and expert-TP groups (same chunks, same parameter order), whether or not it owns anything.
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
    expert weight (TP group = expert-TP group; each EP rank holds different experts).
    ``glu``: Megatron's fused gated fc1, where each TP shard is ``[gate_r; up_r]`` along dim 0, so
    the full tensor is ``[gate_0 … gate_{n-1}; up_0 … up_{n-1}]``, not a plain concatenation.
    """

    tp_dim: int | None = None
    expert: bool = False
    glu: bool = False


@dataclass
class ExportGroups:
    """This rank's share of the export (module docstring). ``tp`` / ``etp``: the (expert-)TP group,
    None for size 1. ``dense_exported``: this rank's TP group is the one (data/context-parallel rank
    0) whose dense tensors are exported; ``owns_dense``: this rank is its TP rank 0. Same for
    experts with the expert-data-parallel rank and the expert-TP group."""

    tp: dist.ProcessGroup | None = None
    etp: dist.ProcessGroup | None = None
    dense_exported: bool = True
    owns_dense: bool = True
    experts_exported: bool = True
    owns_experts: bool = True
    ep_rank: int = 0
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


def gather_full(tensor: torch.Tensor, info: ShardInfo, group: dist.ProcessGroup | None,
                owner: bool) -> torch.Tensor | None:
    """The full tensor on the group's rank 0 (``owner``), None elsewhere (a collective over ``group``).

    The shards are gathered straight into the full tensor where its layout allows it, so the owner
    holds one full tensor and no copy: a dim-0 split gathers into contiguous row blocks of the full
    tensor; a GLU fc1 gathers its gate halves and its up halves in two rounds, each into its own
    rows. A split along another dim gathers into a [n, *shard] buffer that is then permuted (one
    transient copy).
    """
    n = _size(group)
    if info.tp_dim is None or n == 1:
        return tensor if owner else None
    tensor = tensor.contiguous()
    dst = dist.get_global_rank(group, 0)
    shape = list(tensor.shape)
    shape[info.tp_dim] *= n
    if info.tp_dim == 0:
        full = tensor.new_empty(shape) if owner else None
        if info.glu:  # shard r = [gate_r; up_r]; full = [gate_0 … gate_{n-1}; up_0 … up_{n-1}]
            shards = [half.contiguous() for half in tensor.chunk(2, dim=0)]
            targets = full.chunk(2, dim=0) if owner else (None, None)
        else:
            shards, targets = [tensor], [full]
        for shard, target in zip(shards, targets):
            dist.gather(shard, list(target.chunk(n, dim=0)) if owner else None, dst=dst, group=group)
        return full
    stacked = tensor.new_empty([n, *tensor.shape]) if owner else None
    dist.gather(tensor, list(stacked.unbind(0)) if owner else None, dst=dst, group=group)
    if not owner:
        return None
    # [n, ..., d, ...] -> [..., n·d, ...]: shard k fills columns k·d … (k+1)·d − 1 of dim tp_dim.
    return stacked.movedim(0, info.tp_dim).reshape(shape)


def export_hf_weights(
    named_params: Iterable[tuple[str, torch.Tensor]], groups: ExportGroups, name_map: NameMap,
    shard_info: Callable[[str, torch.Tensor], ShardInfo] | None = None, dtype: torch.dtype | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """This rank's own HF ``(name, tensor)`` pairs of one model chunk (module docstring), cast to
    ``dtype`` when given. Memory: one gathered tensor at a time, plus what the consumer keeps."""
    if shard_info is None:
        def shard_info(name: str, param: torch.Tensor) -> ShardInfo:
            return megatron_shard_info(name, param, groups.gated_linear_unit)
    for name, param in named_params:
        info = shard_info(name, param)
        if info.expert:
            if not groups.experts_exported:
                continue
            owner, group = groups.owns_experts, groups.etp
            name = global_name(name, groups.layer_offset, groups.ep_rank * groups.num_local_experts)
        else:
            if not groups.dense_exported:
                continue
            owner, group = groups.owns_dense, groups.tp
            name = global_name(name, groups.layer_offset, 0)
        full = gather_full(param.detach(), info, group, owner)
        if full is None:
            continue
        if dtype is not None:
            full = full.to(dtype)
        parts = name_map(name, full)
        del full  # the parts are copies or views of it: no second full tensor stays alive
        yield from parts
        del parts


def chunk_export_groups(chunk: torch.nn.Module) -> ExportGroups:
    """The :class:`ExportGroups` of one unwrapped ``GPTModel`` chunk on this rank (megatron's
    ``parallel_state``; a group of size 1 is None)."""
    from megatron.core import parallel_state as ps

    tp_size, etp_size = ps.get_tensor_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size()
    dense_exported = ps.get_data_parallel_rank(with_context_parallel=True) == 0
    experts_exported = ps.get_expert_data_parallel_rank() == 0
    experts = [getattr(layer.mlp, "experts", None) for layer in chunk.decoder.layers]
    experts = [e for e in experts if e is not None]
    return ExportGroups(
        tp=ps.get_tensor_model_parallel_group() if tp_size > 1 else None,
        etp=ps.get_expert_tensor_parallel_group() if etp_size > 1 else None,
        dense_exported=dense_exported,
        owns_dense=dense_exported and ps.get_tensor_model_parallel_rank() == 0,
        experts_exported=experts_exported,
        owns_experts=experts_exported and ps.get_expert_tensor_parallel_rank() == 0,
        ep_rank=ps.get_expert_model_parallel_rank(),
        num_local_experts=experts[0].num_local_experts if experts else 0,
        layer_offset=chunk.decoder.layers[0].layer_number - 1 if len(chunk.decoder.layers) else 0,
        gated_linear_unit=chunk.config.gated_linear_unit,
    )


def export_policy_weights(chunks: list[torch.nn.Module], name_map: NameMap,
                          dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """This rank's own HF ``(name, tensor)`` pairs of the whole policy (collective), chunk after
    chunk (VPP: each chunk with its own layer offset). ``chunks``: this rank's unwrapped
    ``GPTModel`` chunks; ``name_map``: ``models.hf_map.hf_name_map``; ``dtype``: the export dtype."""
    for chunk in chunks:
        yield from export_hf_weights(chunk.named_parameters(), chunk_export_groups(chunk), name_map, dtype=dtype)
