"""Process groups: validate the layout, then torch.distributed + megatron ``parallel_state``.

    validate_parallel(parallel, arch, world_size)   # one-line ConfigErrors, before any group exists
    init_parallel(parallel, arch, seed)              # torchrun env -> NCCL (GPU) / gloo (CPU)

Order on CPU (reference §3): the compatibility layer first, then the process group, then
``initialize_model_parallel``, then the seeds (``model_parallel_cuda_manual_seed`` needs fix P2).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from luspo_megatron.config import ParallelConfig, flag_of
from luspo_megatron.errors import ConfigError
from luspo_megatron.models.arch import QwenArch
from luspo_megatron.runtime.distributed import init_process_group

_P = ParallelConfig


def _flag(name: str) -> str:
    return flag_of(_P, name)


def validate_parallel(parallel: ParallelConfig, arch: QwenArch, world_size: int) -> None:
    """Raise a one-line :class:`ConfigError` naming flag, value and rule for a layout that cannot
    work with this model and world size. Needs no process group."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    cp, ep = parallel.context_parallel_size, parallel.expert_model_parallel_size
    etp = parallel.expert_tensor_parallel_size or tp
    vpp = parallel.virtual_pipeline_model_parallel_size or 1
    if world_size % (tp * pp * cp):
        raise ConfigError(
            f"{_flag('tensor_model_parallel_size')} × {_flag('pipeline_model_parallel_size')} × "
            f"{_flag('context_parallel_size')}: world size {world_size} is not divisible by "
            f"tp·pp·cp = {tp}·{pp}·{cp} = {tp * pp * cp}", field="tensor_model_parallel_size")
    if arch.num_attention_heads % tp:
        raise ConfigError(f"{_flag('tensor_model_parallel_size')}: expected a divisor of the "
                          f"{arch.num_attention_heads} attention heads, got {tp}", field="tensor_model_parallel_size")
    if arch.num_query_groups % tp:
        raise ConfigError(f"{_flag('tensor_model_parallel_size')}: expected a divisor of the "
                          f"{arch.num_query_groups} key/value heads (query groups), got {tp}",
                          field="tensor_model_parallel_size")
    if arch.vocab_size % tp or arch.ffn_hidden_size % tp:
        raise ConfigError(f"{_flag('tensor_model_parallel_size')}: expected a divisor of vocab_size "
                          f"{arch.vocab_size} and intermediate_size {arch.ffn_hidden_size}, got {tp}",
                          field="tensor_model_parallel_size")
    if arch.num_layers % (pp * vpp):
        raise ConfigError(
            f"{_flag('pipeline_model_parallel_size')} × {_flag('virtual_pipeline_model_parallel_size')}: "
            f"expected pp·vpp to divide the {arch.num_layers} layers, got {pp}·{vpp} = {pp * vpp}",
            field="pipeline_model_parallel_size")
    if not arch.is_moe:
        if ep > 1:
            raise ConfigError(f"{_flag('expert_model_parallel_size')}: expected 1 for the dense "
                              f"{arch.family} model, got {ep}", field="expert_model_parallel_size")
        return
    if arch.num_experts % ep:
        raise ConfigError(f"{_flag('expert_model_parallel_size')}: expected a divisor of the "
                          f"{arch.num_experts} experts, got {ep}", field="expert_model_parallel_size")
    if ep == 1 and etp < tp:
        # Found by the checkpoint tests: the experts are then replicated over TP ranks that no
        # gradient reduction covers (regular optimizer), and the replicas silently drift apart.
        raise ConfigError(
            f"{_flag('expert_tensor_parallel_size')}: with {_flag('expert_model_parallel_size')} 1 expected "
            f"etp = tp = {tp} (replicated experts would not be reduced across TP), got {etp}",
            field="expert_tensor_parallel_size")
    if arch.moe_ffn_hidden_size % etp:
        raise ConfigError(f"{_flag('expert_tensor_parallel_size')}: expected a divisor of "
                          f"moe_intermediate_size {arch.moe_ffn_hidden_size}, got {etp}",
                          field="expert_tensor_parallel_size")
    if world_size % (etp * ep * pp):
        raise ConfigError(
            f"{_flag('expert_model_parallel_size')} × {_flag('expert_tensor_parallel_size')}: world size "
            f"{world_size} is not divisible by etp·ep·pp = {etp}·{ep}·{pp} = {etp * ep * pp}",
            field="expert_model_parallel_size")


@dataclass(frozen=True)
class Layout:
    """This rank's coordinates once the groups exist."""

    world_size: int
    rank: int
    tp: int
    pp: int
    cp: int
    dp: int
    ep: int
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def current_layout() -> Layout:
    """The layout of the initialised ``parallel_state``."""
    from megatron.core import parallel_state as ps

    return Layout(
        world_size=torch.distributed.get_world_size(), rank=torch.distributed.get_rank(),
        tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
        cp=ps.get_context_parallel_world_size(), dp=ps.get_data_parallel_world_size(),
        ep=ps.get_expert_model_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), cp_rank=ps.get_context_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )


def set_seeds(seed: int) -> None:
    """torch, numpy, random and Megatron's RNG tracker. Like Megatron-LM, each pipeline stage
    offsets the seed (seed + 100·pp_rank) so stages do not draw identical streams."""
    from megatron.core import parallel_state, tensor_parallel

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def init_parallel(parallel: ParallelConfig, arch: QwenArch, seed: int = 1234, timeout_minutes: int = 30) -> Layout:
    """Validate, then create every process group of ``parallel`` and seed. Reads torchrun's
    environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT; LOCAL_RANK on GPU). Re-entrant: an existing
    megatron layout is destroyed first, so tests can run several layouts in one launch."""
    world_size = (torch.distributed.get_world_size() if torch.distributed.is_initialized()
                  else int(os.environ.get("WORLD_SIZE", "1")))
    validate_parallel(parallel, arch, world_size)
    init_process_group(timeout_minutes=timeout_minutes)  # CPU redirections first, each gated on its trigger
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        **parallel.megatron_sizes(), distributed_timeout_minutes=timeout_minutes
    )
    set_seeds(seed)
    return current_layout()

