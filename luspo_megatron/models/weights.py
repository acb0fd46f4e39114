"""Load full (global) tensors into this rank's model chunks: each rank slices its own part.

Every local parameter gets a GLOBAL name (the name it has in a one-process model: global layer
index from ``TransformerLayer.layer_number``, global expert index from the EP rank) and a slicing
rule read from megatron's own parameter attributes:

- ``tensor_model_parallel`` / ``partition_dim``: chunk ``partition_dim`` into the TP size (the
  expert-TP size for parameters under ``mlp.experts``) and keep this rank's chunk;
- SwiGLU ``linear_fc1`` ([gate; up] stacked): chunk the gate half and the up half separately and
  stack this rank's two pieces, which is how ColumnParallelLinear shards a gated unit;
- everything else (norms, router, replicated params) is copied whole.

This covers any TP / ETP / EP / PP / VPP layout, with the same global tensors on every rank.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state

from luspo_megatron.errors import CheckpointError
from luspo_megatron.models.arch import QwenArch
from luspo_megatron.models.hf_map import TensorSource, plans_by_megatron_name, tensor_getter

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT_RE = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")
_GROUPED_EXPERT_RE = re.compile(r"(\.mlp\.experts\.linear_fc[12]\.weight)(\d+)$")


@dataclass(frozen=True)
class LocalParam:
    """A parameter of this rank and where it sits in the global tensor."""

    global_name: str
    param: torch.nn.Parameter
    partition_dim: int | None  # None: replicated (copied whole)
    tp_size: int
    tp_rank: int
    gated: bool  # SwiGLU fc1: gate and up halves are sharded separately

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the full tensor."""
        if self.partition_dim is None or self.tp_size == 1:
            return full
        if self.gated:
            halves = full.chunk(2, dim=self.partition_dim)
            return torch.cat([h.chunk(self.tp_size, dim=self.partition_dim)[self.tp_rank] for h in halves],
                             dim=self.partition_dim)
        return full.chunk(self.tp_size, dim=self.partition_dim)[self.tp_rank]

    def unshard(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every TP rank's slice (rank order); inverse of :meth:`shard`."""
        if self.partition_dim is None or self.tp_size == 1:
            return pieces[0]
        if self.gated:
            halves = [p.chunk(2, dim=self.partition_dim) for p in pieces]
            return torch.cat([torch.cat([h[i] for h in halves], dim=self.partition_dim) for i in (0, 1)],
                             dim=self.partition_dim)
        return torch.cat(pieces, dim=self.partition_dim)


def _global_name(chunk: torch.nn.Module, local_name: str) -> str:
    match = _LAYER_RE.match(local_name)
    if match is None:
        return local_name
    layer = chunk.decoder.layers[int(match.group(1))]
    name = f"decoder.layers.{layer.layer_number - 1}." + local_name[match.end():]
    experts = getattr(layer.mlp, "experts", None)
    if experts is not None:
        offset = parallel_state.get_expert_model_parallel_rank() * experts.num_local_experts
        name = _LOCAL_EXPERT_RE.sub(lambda m: f".mlp.experts.local_experts.{int(m.group(1)) + offset}.", name)
        name = _GROUPED_EXPERT_RE.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + offset}", name)
    return name


def local_params(chunks: list[torch.nn.Module]) -> Iterator[LocalParam]:
    """Every parameter of this rank's (unwrapped) ``GPTModel`` chunks, with its global name."""
    for chunk in chunks:
        gated = chunk.config.gated_linear_unit
        for local_name, param in chunk.named_parameters():
            expert = ".mlp.experts." in local_name
            sharded = getattr(param, "tensor_model_parallel", False)
            if expert:
                size = parallel_state.get_expert_tensor_parallel_world_size()
                rank = parallel_state.get_expert_tensor_parallel_rank()
            else:
                size = parallel_state.get_tensor_model_parallel_world_size()
                rank = parallel_state.get_tensor_model_parallel_rank()
            yield LocalParam(
                global_name=_global_name(chunk, local_name),
                param=param,
                partition_dim=param.partition_dim if sharded else None,
                tp_size=size,
                tp_rank=rank,
                gated=gated and ("linear_fc1.weight" in local_name),
            )


@torch.no_grad()
def load_megatron_tensors(chunks: list[torch.nn.Module], source: TensorSource) -> int:
    """Copy full Megatron tensors (global names) into the local params; returns the count."""
    get = tensor_getter(source)
    count = 0
    for lp in local_params(chunks):
        full = get(lp.global_name)
        piece = lp.shard(full)
        if piece.shape != lp.param.shape:
            raise CheckpointError(f"{lp.global_name}: expected a slice of shape {tuple(lp.param.shape)}, "
                                  f"got {tuple(piece.shape)} from the full {tuple(full.shape)}")
        lp.param.copy_(piece)
        count += 1
    return count


@torch.no_grad()
def load_hf_weights(chunks: list[torch.nn.Module], arch: QwenArch, hf: TensorSource, naming: str = "local") -> int:
    """Load HF weights (on-disk names) into this rank's chunks through ``models.hf_map``.
    Only the HF tensors this rank's parameters need are read. Returns the number of parameters."""
    plans = plans_by_megatron_name(arch, naming)
    get = tensor_getter(hf)

    def megatron_tensor(name: str) -> torch.Tensor:
        if name not in plans:
            raise CheckpointError(f"{name}: no Hugging Face source for this Megatron parameter ({arch.family})")
        plan = plans[name]
        return plan.to_megatron([get(h) for h in plan.hf], arch)

    return load_megatron_tensors(chunks, megatron_tensor)


def hf_safetensors_source(path: str | Path) -> Callable[[str], torch.Tensor]:
    """Lazy reader of a HF model directory's safetensors (single file or sharded with
    ``model.safetensors.index.json``): each tensor is read when asked for."""
    from safetensors import safe_open

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    elif (path / "model.safetensors").is_file():
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            weight_map = {name: "model.safetensors" for name in f.keys()}
    else:
        raise CheckpointError(f"--hf-checkpoint: no model.safetensors(.index.json) in {str(path)!r}")

    def get(name: str) -> torch.Tensor:
        if name not in weight_map:
            raise CheckpointError(f"{path}: tensor {name!r} not in the checkpoint")
        with safe_open(str(path / weight_map[name]), framework="pt") as f:
            return f.get_tensor(name)

    return get
