"""Megatron-Core -> Hugging Face: a training or converted checkpoint written as HF safetensors shards.

See ``convert.py`` for the overview; ``tools/convert_megatron_to_hf.py`` is the command.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from luspo_megatron.checkpoint import atomic, integrity, resume
from luspo_megatron.checkpoint.convert import (
    HF_ASSETS,
    MANIFEST,
    arch_of,
    barrier,
    check_hf_tensors,
    check_output,
    copy_assets,
    meta_hf_tensors,
    prepare_tmp,
    progress_bar,
)
from luspo_megatron.checkpoint.safetensors_io import (
    HF_SHARD_BYTES,
    SafetensorsStreamWriter,
    TensorSpec,
    plan_shards,
    read_config,
    shard_file_names,
    tensor_sha256,
    write_index,
)
from luspo_megatron.errors import CheckpointError
from luspo_megatron.models.arch import QwenArch
from luspo_megatron.models.hf_map import plans_by_megatron_name

logger = logging.getLogger("luspo_megatron.checkpoint.convert")


@dataclass
class ExportPlan:
    checkpoint_dir: Path  # the dist_checkpointing directory itself
    config: dict[str, Any]
    config_source: str
    asset_dir: Path | None
    arch: QwenArch
    save: Path
    manifest: dict[str, Any] | None


def resolve_checkpoint_dir(load: Path) -> Path:
    """A dist checkpoint directory, or a training save directory (its ``latest`` complete one)."""
    if load.name.endswith(atomic.TMP_SUFFIX):
        raise CheckpointError(f"--load: {str(load)!r} is an incomplete save (a .tmp directory is never loaded)")
    if (load / "metadata.json").is_file():
        return load
    if not load.is_dir():
        raise CheckpointError(f"--load: {str(load)!r} is not a directory")
    point = atomic.find_resume_point(load)
    if point is None:
        raise CheckpointError(f"--load: {str(load)!r} holds neither a dist checkpoint (metadata.json) "
                              f"nor a complete iter_XXXXXXX checkpoint")
    for note in point.notes:
        logger.warning(note)
    return point.path


def prepare_megatron_export(load: str | Path, save: str | Path, hf_config_from: str | Path | None,
                            overwrite: bool) -> ExportPlan:
    save = Path(save)
    check_output(save, overwrite)
    directory = resolve_checkpoint_dir(Path(load))
    manifest = None
    if (directory / MANIFEST).is_file():
        manifest = json.loads((directory / MANIFEST).read_text())
    asset_dir = None
    if hf_config_from is not None:
        asset_dir = Path(hf_config_from)
        config, where = read_config(asset_dir, "--hf-config-from"), str(asset_dir / "config.json")
    elif (directory / HF_ASSETS / "config.json").is_file():
        asset_dir = directory / HF_ASSETS
        config, where = read_config(asset_dir, "--load"), str(asset_dir / "config.json")
    else:
        config = _embedded_hf_config(directory)
        where = f"{directory} (hf_config saved with the training checkpoint)"
        if config is None:
            raise CheckpointError(f"--hf-config-from: {directory} carries no Hugging Face config.json; "
                                  f"pass the model's HF directory")
    return ExportPlan(directory, config, where, asset_dir, arch_of(config, where), save, manifest)


def _embedded_hf_config(directory: Path) -> dict[str, Any] | None:
    common = directory / "common.pt"
    if not common.is_file():
        return None
    try:
        state = torch.load(common, map_location="cpu", weights_only=False)
    except Exception as err:  # damaged bytes raise whatever the unpickler meets
        raise CheckpointError(f"--load: {common}: unreadable ({resume.error_text(err)})") from None
    meta = state.get("luspo") if isinstance(state, dict) else None
    return meta.get("hf_config") if isinstance(meta, dict) else None


def official_config(config: dict[str, Any], dtype: torch.dtype | None) -> dict[str, Any]:
    """``config.json`` with the official Qwen key names: ``num_experts`` (transformers 5 writes
    ``num_local_experts``), top-level ``rope_theta`` (transformers 5 nests it in
    ``rope_parameters``) and ``torch_dtype`` (transformers 5: ``dtype``), which transformers 4
    and 5, SGLang and vLLM all read. ``dtype``: the dtype of the written weights, if one."""
    out = dict(config)
    if "num_local_experts" in out:
        out.setdefault("num_experts", out.pop("num_local_experts"))
    params = out.pop("rope_parameters", None) or {}
    if "rope_theta" not in out and "rope_theta" in params:
        out["rope_theta"] = params["rope_theta"]
    if params.get("rope_type", "default") != "default":
        out["rope_scaling"] = params
    out.setdefault("rope_scaling", None)
    dtype_name = out.pop("dtype", None)
    if dtype is not None:
        dtype_name = str(dtype).removeprefix("torch.")
    if dtype_name is not None:
        out["torch_dtype"] = dtype_name
    return out


def convert_megatron_to_hf(
    plan: ExportPlan,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = HF_SHARD_BYTES,
    allow_extra: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Write ``plan.save`` (see the module docstring). Collective: every rank calls it, inside
    :func:`distributed_session`. Returns a report."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
        CachedMetadataFileSystemReader,
    )
    from torch.distributed.checkpoint import TensorStorageMetadata

    from luspo_megatron.checkpoint.schema import checkpoint_schema

    start = time.perf_counter()
    rank, world = dist.get_rank(), dist.get_world_size()
    arch = plan.arch
    schema = checkpoint_schema(arch)
    plans = plans_by_megatron_name(arch)
    # A training checkpoint's files against its checksums.json (each rank hashes a slice); without
    # one, a damaged file is reported by the reads below as a one-line CheckpointError.
    verdict = integrity.verify(plan.checkpoint_dir)
    if verdict.status == "failed":
        raise CheckpointError(f"--load: {plan.checkpoint_dir} is damaged: {verdict.problem}")
    source = resume.Chosen(None, plan.checkpoint_dir, {}, verified=verdict.status == "verified")
    reader = CachedMetadataFileSystemReader(str(plan.checkpoint_dir))
    with resume.readable(source):
        stored = {k: v for k, v in reader.read_metadata().state_dict_metadata.items()
                  if isinstance(v, TensorStorageMetadata)}
    model_keys = {k: tuple(v.size) for k, v in stored.items()
                  if k.startswith(("embedding.", "decoder.", "output_layer."))}  # not optimizer.*
    check_hf_tensors(model_keys, schema.keys(), str(plan.checkpoint_dir), allow_extra)

    # Every exported HF tensor, in model order (embedding, layer by layer, final norm, lm_head).
    def position(slot) -> float:
        layer = plans[slot.name].layer
        return -1 if slot.name.startswith("embedding.") else float("inf") if layer is None else layer

    slots = sorted(schema.slots.values(), key=position)  # stable: plan order within a layer
    specs: list[TensorSpec] = []
    source_of: dict[str, Any] = {}
    for slot in slots:
        tensor_plan = plans[slot.name]
        if not tensor_plan.exported:
            continue
        out_dtype = dtype or stored[slot.key].properties.dtype
        for hf_name, meta in meta_hf_tensors(tensor_plan, slot, arch).items():
            specs.append(TensorSpec(hf_name, tuple(meta.shape), out_dtype))
            source_of[hf_name] = slot
    shards = plan_shards(specs, max_shard_bytes)
    names = shard_file_names(len(shards))
    my_shards = [i for i in range(len(shards)) if i % world == rank]

    def load_keys(keys: Sequence[str]) -> dict[str, torch.Tensor]:
        tensors = {k: torch.empty(stored[k].size, dtype=stored[k].properties.dtype) for k in keys}
        with resume.readable(source):
            dcp.load(tensors, storage_reader=reader, no_dist=True)
        return tensors

    tmp = prepare_tmp(plan.save, rank)
    checksums: dict[str, str] = {}
    # A converted checkpoint that kept the source dtypes: every tensor exported in its stored dtype
    # must hash like its source tensor.
    verify = plan.manifest is not None and plan.manifest.get("dtype") is None
    my_bytes = sum(s.nbytes for i in my_shards for s in shards[i])
    with progress_bar(progress and rank == 0, my_bytes, f"Megatron -> HF (rank 0 of {world})") as advance:
        for index in my_shards:
            writer = SafetensorsStreamWriter(tmp / names[index], shards[index])
            # One group of consecutive tensors per layer: its keys are read together, then freed.
            groups: list[list[TensorSpec]] = []
            for spec in shards[index]:
                layer = plans[source_of[spec.name].name].layer
                if groups and plans[source_of[groups[-1][0].name].name].layer == layer:
                    groups[-1].append(spec)
                else:
                    groups.append([spec])
            for group in groups:
                keys = list(dict.fromkeys(source_of[s.name].key for s in group))
                loaded = load_keys(keys)
                done: dict[str, dict[str, torch.Tensor]] = {}
                for spec in group:
                    slot = source_of[spec.name]
                    if slot.name not in done:
                        full = loaded[slot.key][slot.prepend_index] if slot.prepend_index else loaded[slot.key]
                        done[slot.name] = plans[slot.name].to_hf(full, arch)
                    tensor = done[slot.name].pop(spec.name).to(spec.dtype)
                    if verify and spec.dtype == stored[slot.key].properties.dtype:
                        checksums[spec.name] = tensor_sha256(tensor)
                    writer.write(spec.name, tensor)
                    advance(spec.nbytes)
                del loaded, done
            writer.close()

    gathered: list = [None] * world
    dist.all_gather_object(gathered, checksums)
    verified = None
    checksums = {k: v for part in gathered for k, v in part.items()}
    if checksums:
        source = plan.manifest["checksums"]["tensors"]
        differ = sorted(n for n in checksums if source.get(n) != checksums[n])
        if differ:
            raise CheckpointError(f"{plan.checkpoint_dir}: {len(differ)} exported tensors differ from the "
                                  f"source checksums in {MANIFEST}: {', '.join(differ)}")
        verified = len(checksums)
    if rank == 0:
        write_index(tmp, shards, names)
        if plan.asset_dir is not None:
            copy_assets(plan.asset_dir, tmp, include_config=False)
        written = {spec.dtype for spec in specs}
        config = official_config(plan.config, written.pop() if len(written) == 1 else None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        atomic.commit_dir(tmp, plan.save)
    barrier()
    return {"tensors": len(specs), "files": len(shards), "bytes": sum(s.nbytes for s in specs),
            "seconds": time.perf_counter() - start, "verified_against_source": verified,
            "config_from": plan.config_source}
