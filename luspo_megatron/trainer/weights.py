"""The policy's weights, out of Megatron: to the rollout engines (step 7), or to a HF directory.

Both are collectives over every trainer rank, and no rank ever holds the whole model: each rank
exports only the tensors it owns (``parallel/export.py``) and pushes them itself.

    sync_weights(policy, engine, version)   # every rank; ``engine`` on rank 0, None elsewhere

1. rank 0 (the engines' coordinator, ``rollout/updates.py``) pauses and flushes the engines and
   broadcasts the small :class:`~luspo_megatron.rollout.updates.SyncPlan`: every rank waits for the
   pause there before it sends anything;
2. every rank pushes its own tensors (``rollout/push.py``): shards into the staging directory,
   buckets through its own update group, or tensor posts; a rank that owns nothing sends nothing,
   but takes part in its TP group's gathers to the end;
3. the ranks' reports (small: counts, names → files, an error) are gathered; rank 0 finishes the
   sync (disk: index, publish by rename, ``/update_weights_from_disk``) and resumes the engines
   whatever failed;
4. the outcome is broadcast: a failure is the same :class:`RolloutError`, naming the server, on
   every rank, and no rank is left waiting in a collective.
"""

from __future__ import annotations

import atexit
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from luspo_megatron.errors import CheckpointError, RolloutError
from luspo_megatron.rollout import weight_sync
from luspo_megatron.rollout.engine import RolloutEngine
from luspo_megatron.rollout.push import ShardPusher
from luspo_megatron.rollout.sync_plan import ShardReport
from luspo_megatron.runtime.distributed import broadcast_object

log = logging.getLogger("luspo_megatron.trainer")
_PUSHER: ShardPusher | None = None  # this process's (its HTTP session and update group live across syncs)


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(obj: Any) -> list[Any]:
    rank, world = _world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)  # small: counts, names -> files, an error string
    return out


def _pusher(rank: int) -> ShardPusher:
    global _PUSHER
    if _PUSHER is None or _PUSHER.rank != rank:
        _PUSHER = ShardPusher(rank)
        atexit.register(_PUSHER.close)
    return _PUSHER


def _agree(error: str | None) -> None:
    """Raise rank 0's ``error`` on every rank."""
    error = broadcast_object(error)
    if error is not None:
        raise RolloutError(error)


def sync_weights(policy: Any, engine: RolloutEngine | None, version: str) -> None:
    """Push the policy to the engines under ``version`` (collective; ``engine`` is None off rank 0)."""
    rank, world = _world()
    sharded = broadcast_object(hasattr(engine, "begin_weight_sync") if rank == 0 else None)
    if not sharded:
        _sync_without_coordinator(policy, engine, version, rank, world)
        return
    plan, error = None, None
    if rank == 0:
        try:
            plan = engine.begin_weight_sync(version)
        except RolloutError as err:
            error = str(err)
    _agree(error)
    plan = broadcast_object(plan)
    reports = _gather(_pusher(rank).push(plan, policy.hf_weights()))
    if rank == 0:
        try:
            engine.end_weight_sync(plan, reports)
        except RolloutError as err:
            error = str(err)
    _agree(error)


def _sync_without_coordinator(policy: Any, engine: Any, version: str, rank: int, world: int) -> None:
    """Engines without the sharded protocol (the in-process engine): the whole stream in one
    process; with several ranks the owners write a staged HF directory that rank 0 publishes and
    has the engine load."""
    if world == 1:
        engine.sync_weights(policy.hf_weights(), version)
        return
    path = write_hf(policy, Path(engine.weights_dir) if rank == 0 else None,
                    Path(engine.config_dir) if rank == 0 else None,
                    bucket_bytes=engine.bucket_bytes if rank == 0 else 1, is_rank0=rank == 0)
    error = None
    if rank == 0:
        try:
            engine.update_weights_from_disk(path, version)
        except RolloutError as err:
            error = str(err)
    _agree(error)


def write_hf(policy: Any, out_dir: Path | None, config_dir: Path | None, *, bucket_bytes: int, is_rank0: bool,
             extra_files: Iterable[Path] = ()) -> Path:
    """Write the policy as a HF model directory: every owning rank writes its own shards into one
    staging directory, rank 0 publishes it by rename once all have finished (every rank calls;
    ``out_dir``, ``config_dir`` and ``bucket_bytes`` are rank 0's)."""
    rank, _ = _world()
    setup = None
    if is_rank0:
        try:
            setup = (str(weight_sync.stage_dir(out_dir)), str(out_dir), bucket_bytes, None)
        except OSError as err:
            setup = (None, str(out_dir), bucket_bytes, f"writing {out_dir}: {err}")
    stage, out, bucket_bytes, error = broadcast_object(setup)
    if error is not None:
        raise CheckpointError(error)
    report = ShardReport(rank)
    stream = iter(policy.hf_weights())
    try:
        buckets = weight_sync.bucket_by_bytes(stream, bucket_bytes)
        report.weight_map = weight_sync.write_shards(buckets, stage, f"model-rank{rank:05d}")
        report.tensors = len(report.weight_map)
    except (OSError, ValueError) as err:
        report.error = f"writing {out}: rank {rank}: {err}"
    for _ in stream:  # keep the exporter's collectives in step after a failure
        pass
    reports = _gather(report)
    error = next((r.error for r in reports if r.error), None)
    if is_rank0:
        if error is None:
            try:
                weight_sync.publish_shards(stage, out, [r.weight_map for r in reports], config_dir, extra_files)
            except (OSError, ValueError) as err:
                error = f"writing {out}: {err}"
        else:
            weight_sync.discard_stage(stage)
    error = broadcast_object(error)
    if error is not None:
        raise CheckpointError(error)
    return Path(out)

