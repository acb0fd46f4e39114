"""The policy's weights, out of Megatron: to the rollout engines (step 7), or to a HF directory.

Both are collectives: every rank streams the export (``parallel/export.py``); the rank that holds
the engines (rank 0) consumes it, the others drain it in lockstep.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from luspo_megatron.rollout.engine import RolloutEngine
from luspo_megatron.rollout.weight_sync import bucket_by_bytes, write_hf_checkpoint


def _drain(stream: Iterable) -> None:
    for _ in stream:  # each item is a collective step on the model-parallel groups
        pass


def sync_weights(policy: Any, engine: RolloutEngine | None, version: str) -> None:
    """Push the policy to the engines under ``version`` (``engine`` is None off rank 0)."""
    weights = policy.hf_weights()
    if engine is None:
        _drain(weights)
    else:
        engine.sync_weights(weights, version)


def write_hf(policy: Any, out_dir: Path, config_dir: Path, *, bucket_bytes: int, is_rank0: bool,
             extra_files: Iterable[Path] = ()) -> Path:
    """Write the policy as a HF model directory (published by rename; rank 0 writes, every rank calls)."""
    weights = policy.hf_weights()
    if is_rank0:
        write_hf_checkpoint(bucket_by_bytes(weights, bucket_bytes), out_dir, config_dir, extra_files=extra_files)
    else:
        _drain(weights)
    if dist.is_initialized():
        dist.barrier()
    return out_dir
