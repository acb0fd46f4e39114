"""Hugging Face -> Megatron-Core: a HF directory streamed into a dist_checkpointing checkpoint of any layout.

See ``convert.py`` for the overview; ``tools/convert_hf_to_megatron.py`` is the command.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from luspo_megatron.checkpoint import atomic
from luspo_megatron.checkpoint.convert import (
    DEFAULT_TARGET,
    FORMAT,
    HF_ASSETS,
    MANIFEST,
    TargetLayout,
    arch_of,
    barrier,
    check_hf_tensors,
    check_output,
    check_target,
    copy_assets,
    expected_hf_tensors,
    meta_hf_tensors,
    prepare_tmp,
    progress_bar,
)
from luspo_megatron.checkpoint.safetensors_io import (
    HFCheckpoint,
    TensorReader,
)
from luspo_megatron.models.arch import QwenArch
from luspo_megatron.models.hf_map import plans_by_megatron_name

logger = logging.getLogger("luspo_megatron.checkpoint.convert")


@dataclass
class ImportPlan:
    checkpoint: HFCheckpoint
    arch: QwenArch
    save: Path
    expected: dict[str, tuple[int, ...]]  # HF tensor -> shape
    extra: list[str]  # source tensors the model does not use (allowed by --allow-extra)


def prepare_hf_import(hf_dir: str | Path, save: str | Path, target: TargetLayout = DEFAULT_TARGET,
                      overwrite: bool = False, allow_extra: bool = False) -> ImportPlan:
    """Everything that can be refused before a process group exists: the output directory, the
    config, every safetensors header, the tensor names and shapes, the target layout."""
    save = Path(save)
    check_output(save, overwrite)
    checkpoint = HFCheckpoint.open(hf_dir)
    arch = arch_of(checkpoint.config, str(Path(hf_dir) / "config.json"))
    check_target(arch, target)
    expected = expected_hf_tensors(checkpoint.config, arch)
    extra = check_hf_tensors({n: i.shape for n, i in checkpoint.tensors.items()}, expected,
                             str(checkpoint.directory), allow_extra)
    return ImportPlan(checkpoint, arch, save, expected, extra)


def convert_hf_to_megatron(
    plan: ImportPlan,
    target: TargetLayout = DEFAULT_TARGET,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write ``plan.save`` (see the module docstring). Collective: every rank calls it, inside
    :func:`distributed_session`. Returns a report (with this rank's streaming statistics)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from luspo_megatron.checkpoint.dist_save import SyncTorchDistSaveStrategy
    from luspo_megatron.checkpoint.schema import checkpoint_schema

    start = time.perf_counter()
    rank, world = dist.get_rank(), dist.get_world_size()
    arch, source = plan.arch, plan.checkpoint
    schema = checkpoint_schema(arch)
    plans = plans_by_megatron_name(arch)
    mapped = {}
    for name, slot in schema.slots.items():
        if name not in plans:
            raise RuntimeError(f"no Hugging Face source for the Megatron parameter {name} ({arch.family})")
        mapped.update({h: tuple(t.shape) for h, t in meta_hf_tensors(plans[name], slot, arch).items()})
    if mapped != plan.expected:  # megatron's parameters vs transformers' checkpoint layout
        raise RuntimeError(f"hf_map does not cover the {arch.family} checkpoint exactly: "
                           f"{sorted(set(mapped) ^ set(plan.expected))}")

    def slot_dtype(name: str) -> torch.dtype:
        return dtype or source.tensors[plans[name].hf[0]].dtype

    # Parameters in the order of the files that hold them; each rank a contiguous block by bytes.
    order = {name: i for i, name in enumerate(plans)}
    file_index = {f: i for i, f in enumerate(source.files)}
    slots = sorted(schema.slots.values(),
                   key=lambda s: (min(file_index[source.tensors[h].file] for h in plans[s.name].hf), order[s.name]))
    sizes = [s.numel() * torch.empty((), dtype=slot_dtype(s.name)).element_size() for s in slots]
    total = sum(sizes)
    mine, my_bytes, seen = [], 0, 0
    for slot, size in zip(slots, sizes):
        # the rank whose 1/world share of the bytes holds this parameter's midpoint
        if rank == min(world - 1, int((seen + size / 2) * world / total)):
            mine.append(slot)
            my_bytes += size
        seen += size

    # Every slot's chunks on every rank, so that a layout that cannot be chunked fails everywhere,
    # before anything collective.
    slot_chunks = {s.name: s.chunks(target.expert_tp if s.expert else target.tp) for s in slots}
    state: dict[str, Any] = {}
    chunks = {}
    for slot in mine:
        for i, chunk in enumerate(slot_chunks[slot.name]):
            data = torch.empty(chunk.shape, dtype=slot_dtype(slot.name), device="meta")
            state[f"{slot.name}#{i}"] = ShardedTensor.from_rank_offsets(
                slot.key, data, *chunk.rank_offsets, replica_id=0, prepend_axis_num=len(slot.prepend_index))
            chunks[(slot.key, chunk.offset)] = chunk
    for i, obj in enumerate(schema.sharded_objects):
        state[f"_object#{i}"] = obj  # megatron's (empty) _extra_state entries; written by rank 0

    reader = TensorReader(source)
    live = reader.live
    cached: list = [None, None]  # (parameter name, full Megatron tensor): one at a time

    tmp = prepare_tmp(plan.save, rank)
    with progress_bar(progress and rank == 0, my_bytes, f"HF -> Megatron (rank 0 of {world})") as advance:
        def resolve(key: str, offset: tuple[int, ...]) -> torch.Tensor:
            chunk = chunks[(key, offset)]
            name = chunk.slot.name
            if cached[0] != name:
                cached[:] = [None, None]  # release the previous tensor before reading the next
                cached[:] = [name, live.track(plans[name].assemble(reader.get, arch))]
            piece = cached[1][chunk.slices].to(slot_dtype(name))
            if piece.untyped_storage().nbytes() != piece.nbytes:
                piece = piece.clone()  # a slice: write (and hold) only its own bytes
            advance(piece.nbytes)
            return live.track(piece)

        dist_checkpointing.save(state, str(tmp), sharded_strategy=SyncTorchDistSaveStrategy(resolve))
    cached[:] = [None, None]
    reader.close()

    gathered: list = [None] * world
    dist.all_gather_object(gathered, reader.checksums)
    checksums = {k: v for part in gathered for k, v in part.items()}
    if rank == 0:
        if set(checksums) != set(plan.expected):
            raise RuntimeError(f"converted {len(checksums)} source tensors, expected {len(plan.expected)}")
        manifest = {
            "format": FORMAT,
            "version": 1,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "source_dir": str(source.directory.resolve()),
            "source_config": source.config,
            "tensor_count": len(checksums),
            "megatron_tensor_count": len(schema.slots),
            "ignored_extra_tensors": plan.extra,
            "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
            "target_layout": {"tp": target.tp, "pp": target.pp, "ep": target.ep, "etp": target.expert_tp},
            "checksums": {"algorithm": "sha256", "tensors": dict(sorted(checksums.items()))},
            "versions": _versions(),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        copy_assets(source.directory, tmp / HF_ASSETS, include_config=True)
        atomic.commit_dir(tmp, plan.save)
    barrier()
    return {
        "tensors": len(plan.expected),
        "bytes": total,
        "seconds": time.perf_counter() - start,
        "rank_bytes_read": reader.bytes_read,
        "peak_live_files": live.peak_tags,
        "peak_live_tensors": live.peak_tensors,
        "peak_live_bytes": live.peak_bytes,
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "megatron-core", "safetensors", "transformers")}
