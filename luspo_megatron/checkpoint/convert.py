"""Hugging Face ⇄ Megatron-Core checkpoint conversion, streamed one tensor (or one layer) at a time.

HF -> Megatron (``hf_import.py::convert_hf_to_megatron``)::

    safetensors shards --TensorReader--> hf_map plan (q,k,v -> linear_qkv, ...) --> chunk of the
    target layout --SyncTorchDistSaveStrategy--> dist_checkpointing checkpoint (torch_dist)

Each rank owns a contiguous block of parameters (in safetensors file order, balanced by bytes) and
produces each stored chunk only when torch writes it: at any moment a rank holds one Megatron
tensor and the few HF tensors it is built from. The keys, shapes and prepended expert axes are
those of ``GPTModel.sharded_state_dict()`` (see ``schema``), so any TP/PP/EP layout loads the
result with ``dist_checkpointing.load`` and reshards it. Output: ``<save>.tmp``, renamed to
``<save>`` once complete, holding the checkpoint, ``luspo_manifest.json`` (source config, tensor
count, sha256 of every source tensor) and ``hf/`` (the source config and tokenizer files).

Megatron -> HF (``hf_export.py::convert_megatron_to_hf``): each rank writes whole output files (sharded at
5 GB, with ``model.safetensors.index.json``) from the checkpoint keys of one layer at a time,
read with torch DCP (no collectives), in the on-disk per-expert names that transformers and SGLang
load. ``config.json`` uses the official key names. When the checkpoint carries a manifest and the
dtype is unchanged, every exported tensor's sha256 is checked against its source.

Both run in one process or under torchrun (all ranks call the same function). This module holds
what both directions share: the target layout, the checks made before any process group exists,
the process-group session and the temporary directory protocol; ``hf_import.py`` and
``hf_export.py`` hold one direction each.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from luspo_megatron.checkpoint import atomic
from luspo_megatron.errors import CheckpointError, ConfigError
from luspo_megatron.models.arch import FAMILIES, QwenArch, arch_from_hf
from luspo_megatron.models.hf_map import TensorPlan

logger = logging.getLogger(__name__)

MANIFEST = "luspo_manifest.json"
HF_ASSETS = "hf"
FORMAT = "luspo-megatron/hf-import"
DTYPE_FLAGS = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
# Copied next to the weights, both ways (tokenizer + generation defaults; config.json is rewritten).
ASSET_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
               "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json")


@dataclass(frozen=True)
class TargetLayout:
    """The layout a converted checkpoint is chunked for (any layout can still load it)."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None  # expert tensor parallel; None: = tp

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp


DEFAULT_TARGET = TargetLayout()


# ------------------------------------------------------------------------------------ validation
def arch_of(config: dict[str, Any], where: str) -> QwenArch:
    """The architecture of a HF config, with config mistakes reported as CheckpointErrors."""
    if config.get("model_type") not in FAMILIES:
        raise CheckpointError(f"{where}: model_type: expected one of {FAMILIES}, got {config.get('model_type')!r}")
    try:
        return arch_from_hf(config)
    except ConfigError as err:
        raise CheckpointError(f"{where}: {err}") from None


def check_target(arch: QwenArch, target: TargetLayout) -> None:
    """One-line errors for a layout the model cannot be split into (before any work)."""
    def need(ok: bool, flag: str, value: int, what: str) -> None:
        if not ok:
            raise CheckpointError(f"{flag}: expected a divisor of {what}, got {value}")

    for flag, value in (("--target-tp", target.tp), ("--target-pp", target.pp), ("--target-ep", target.ep),
                        ("--target-etp", target.expert_tp)):
        if value < 1:
            raise CheckpointError(f"{flag}: expected a positive integer, got {value}")
    need(arch.num_attention_heads % target.tp == 0, "--target-tp", target.tp,
         f"the {arch.num_attention_heads} attention heads")
    need(arch.num_query_groups % target.tp == 0, "--target-tp", target.tp,
         f"the {arch.num_query_groups} key/value heads")
    need(arch.vocab_size % target.tp == 0, "--target-tp", target.tp, f"vocab_size {arch.vocab_size}")
    if not arch.is_moe or not all(arch.moe_layers):  # some dense MLP layers
        need(arch.ffn_hidden_size % target.tp == 0, "--target-tp", target.tp,
             f"intermediate_size {arch.ffn_hidden_size}")
    need(arch.num_layers % target.pp == 0, "--target-pp", target.pp, f"the {arch.num_layers} layers")
    if not arch.is_moe:
        if target.ep != 1:
            raise CheckpointError(f"--target-ep: expected 1 for the dense {arch.family} model, got {target.ep}")
        return
    need(arch.num_experts % target.ep == 0, "--target-ep", target.ep, f"the {arch.num_experts} experts")
    need(arch.moe_ffn_hidden_size % target.expert_tp == 0, "--target-etp", target.expert_tp,
         f"moe_intermediate_size {arch.moe_ffn_hidden_size}")


def check_output(path: Path, overwrite: bool, flag: str = "--save") -> None:
    if path.exists() and not overwrite:
        raise CheckpointError(f"{flag}: {str(path)!r} already exists (pass --overwrite to replace it)")


def meta_hf_tensors(plan: TensorPlan, slot, arch: QwenArch) -> dict[str, torch.Tensor]:
    return plan.to_hf(torch.empty(slot.shape, device="meta"), arch)


def expected_hf_tensors(config: dict[str, Any], arch: QwenArch) -> dict[str, tuple[int, ...]]:
    """On-disk names and shapes of a HF checkpoint of ``config``, from transformers itself: the
    model built on the meta device (no memory), its live state dict in on-disk names."""
    import transformers

    from luspo_megatron.models.arch import transformers_config
    from luspo_megatron.models.hf_map import hf_live_to_disk

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers_config(config))
    disk = hf_live_to_disk(model.state_dict(), arch.tie_word_embeddings)
    return {name: tuple(tensor.shape) for name, tensor in disk.items()}


def check_hf_tensors(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                     where: str, allow_extra: bool) -> list[str]:
    """Missing (all named), wrong shape (name and both shapes), extra (named unless allowed).
    Returns the extra names that were allowed."""
    missing = sorted(set(expected) - set(found))
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} tensors missing: {', '.join(missing)}")
    for name, shape in expected.items():
        if tuple(found[name]) != tuple(shape):
            raise CheckpointError(f"{where}: tensor {name} has shape {tuple(found[name])}, expected {tuple(shape)}")
    extra = sorted(set(found) - set(expected))
    if extra and not allow_extra:
        raise CheckpointError(f"{where}: {len(extra)} unexpected tensors (pass --allow-extra to ignore them): "
                              f"{', '.join(extra)}")
    return extra


# ------------------------------------------------------------------------------ process groups
@contextlib.contextmanager
def distributed_session() -> Iterator[tuple[int, int]]:
    """torch.distributed (gloo: conversion is CPU work) from the torchrun environment, or a group
    of one, and megatron ``parallel_state`` in the one-process layout, after the CPU compatibility
    layer; yields (rank, world size) and tears down only what it set up (a caller's own process
    group survives)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from luspo_megatron.runtime.distributed import init_process_group

    own_group = init_process_group("gloo")
    own_state = not parallel_state.model_parallel_is_initialized()
    if own_state:
        parallel_state.initialize_model_parallel()
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        if own_state:
            parallel_state.destroy_model_parallel()
        if own_group:
            dist.destroy_process_group()


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, description: str) -> Iterator:
    """Yields ``advance(nbytes)``; a rich progress bar in bytes when enabled (rank 0)."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def prepare_tmp(final: Path, rank: int) -> Path:
    tmp = atomic.tmp_path(final)
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crashed run
        tmp.mkdir(parents=True)
    barrier()
    return tmp


def copy_assets(source: Path, dest: Path, include_config: bool) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    names = [n for n in (*ASSET_FILES, *(("config.json",) if include_config else ())) if (source / n).is_file()]
    for name in names:
        shutil.copy2(source / name, dest / name)
    return names
