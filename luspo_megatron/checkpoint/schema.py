"""Where every Megatron parameter of a Qwen model lives in a ``dist_checkpointing`` checkpoint,
read from megatron itself.

A dist checkpoint stores each parameter as a GLOBAL tensor (its one-process shape) under a key.
Which key, and which leading "prepended" axes, is megatron's business: local-spec norms are stored
under Transformer Engine names (``input_layernorm`` -> ``linear_qkv.layer_norm_weight``), the
SequentialMLP experts of a layer are stacked on a prepended expert axis
(``mlp.experts.experts.linear_fc1.weight`` [E, 2·I, H]), and every rank of every layout loads its
slice of those global tensors. Rather than re-encode these rules, :func:`checkpoint_schema` builds
the model once on the meta device (no memory) in the one-process layout, where every parameter IS
its global tensor, asks megatron for its ``sharded_state_dict`` and reads off, per parameter, the
key, the prepended index and the tensor-parallel partition. The converters then write or read
exactly what ``GPTModel.sharded_state_dict()`` of any layout asks for.

Chunking: a parameter is written in the chunks a tensor-parallel rank of ``tp`` owns (two per rank
for SwiGLU ``linear_fc1``, whose gate and up halves are split separately), so that loading in that
layout reads each rank's bytes contiguously; any other layout still loads (torch DCP reads the
overlaps). Experts are one chunk each, layers one key each, so pipeline and expert parallelism
need no extra chunking.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from luspo_megatron.errors import CheckpointError
from luspo_megatron.models.arch import QwenArch


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a parameter: ``slices`` of the full parameter (no prepended axes)."""

    slot: ParamSlot
    offset: tuple[int, ...]  # global offset in the checkpoint tensor, prepended axes first
    slices: tuple[slice, ...]
    rank_offsets: tuple[tuple[int, int, int], ...]  # megatron's (axis, index, fragments)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.slices)


@dataclass(frozen=True)
class ParamSlot:
    """One Megatron parameter (global name, full tensor) in the checkpoint."""

    name: str  # global Megatron name, hf_map "local" naming
    key: str  # dist_checkpointing key
    prepend_index: tuple[int, ...]  # index on the prepended axes: (expert,) for experts, else ()
    prepend_shape: tuple[int, ...]
    shape: tuple[int, ...]  # the full parameter
    partition_dim: int | None  # tensor-parallel split dimension; None: replicated
    gated: bool  # SwiGLU fc1: [gate; up], each half split separately
    expert: bool  # split by the expert tensor-parallel size

    @property
    def global_shape(self) -> tuple[int, ...]:
        return self.prepend_shape + self.shape

    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    def fragments(self, tp: int) -> int:
        """How many equal pieces ``partition_dim`` is cut into for tensor-parallel size ``tp``."""
        if self.partition_dim is None:
            return 1
        return tp * (2 if self.gated else 1)

    def chunks(self, tp: int) -> list[Chunk]:
        """The stored chunks for a target tensor-parallel size ``tp`` (expert-TP for experts)."""
        prepend = len(self.prepend_index)
        base = tuple((axis, index, size) for axis, (index, size) in enumerate(zip(self.prepend_index,
                                                                                 self.prepend_shape)))
        frags = self.fragments(tp)
        full = tuple(slice(0, n) for n in self.shape)
        if frags == 1:
            return [Chunk(self, self.prepend_index + (0,) * len(self.shape), full, base)]
        dim = self.partition_dim
        if self.shape[dim] % frags:
            raise CheckpointError(
                f"--target-tp {tp}: {self.name} has {self.shape[dim]} rows on its split dimension {dim}, "
                f"not divisible into {frags} pieces")
        step = self.shape[dim] // frags
        out = []
        for i in range(frags):
            slices = tuple(slice(i * step, (i + 1) * step) if d == dim else s for d, s in enumerate(full))
            offset = self.prepend_index + tuple(s.start for s in slices)
            out.append(Chunk(self, offset, slices, base + ((prepend + dim, i, frags),)))
        return out


@dataclass
class CheckpointSchema:
    """Every parameter slot of a model, by global Megatron name, plus megatron's sharded objects
    (``_extra_state`` placeholders that a model load asks for)."""

    slots: dict[str, ParamSlot]
    sharded_objects: list = field(default_factory=list)

    def keys(self) -> dict[str, tuple[int, ...]]:
        """Checkpoint key -> global shape."""
        return {slot.key: slot.global_shape for slot in self.slots.values()}


def _sharded_tensors(entry) -> list:
    """The ShardedTensors behind one state-dict entry (a factory, e.g. SwiGLU's, builds several)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    holder = {"entry": entry}
    apply_factories(holder)
    return [v for v in nested_values(holder) if isinstance(v, ShardedTensor)]


def checkpoint_schema(arch: QwenArch) -> CheckpointSchema:
    """The schema of ``arch``, from a meta-device megatron model in the one-process layout.

    Needs torch.distributed and megatron ``parallel_state`` initialised with tp = pp = ep = 1
    (data parallel over any number of ranks), and the CPU compatibility layer applied."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from luspo_megatron.models.build import build_model
    from luspo_megatron.models.megatron_config import transformer_config
    from luspo_megatron.models.weights import local_params

    sizes = (parallel_state.get_tensor_model_parallel_world_size(),
             parallel_state.get_pipeline_model_parallel_world_size(),
             parallel_state.get_expert_model_parallel_world_size())
    if sizes != (1, 1, 1):
        raise RuntimeError(f"checkpoint_schema needs tp = pp = ep = 1 process groups, got {sizes}")
    config = transformer_config(arch, perform_initialization=False, use_cpu_initialization=True)
    with torch.device("meta"):
        (model,) = build_model(arch, config, use_transformer_engine=False)
    params = {lp.global_name: lp for lp in local_params([model])}
    slots: dict[str, ParamSlot] = {}
    objects = []
    for name, entry in model.sharded_state_dict().items():
        if isinstance(entry, ShardedObject):
            objects.append(entry)
            continue
        if name not in params:
            raise RuntimeError(f"megatron state-dict entry {name!r} is not a parameter")
        lp = params[name]
        tensors = _sharded_tensors(entry)
        first = tensors[0]
        prepend = first.prepend_axis_num
        if tuple(first.global_shape[prepend:]) != tuple(lp.param.shape):
            raise RuntimeError(f"{name}: checkpoint shape {first.global_shape} does not hold the "
                               f"parameter {tuple(lp.param.shape)} (one-process layout expected)")
        slots[name] = ParamSlot(
            name=name,
            key=first.key,
            prepend_index=tuple(first.global_offset[:prepend]),
            prepend_shape=tuple(first.global_shape[:prepend]),
            shape=tuple(lp.param.shape),
            partition_dim=lp.partition_dim,
            gated=lp.gated,
            expert=".mlp.experts." in name,
        )
    return CheckpointSchema(slots, objects)
