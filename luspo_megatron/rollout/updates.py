"""SGLang's three weight-update paths at scale: one sync = pause → flush → update → version → continue.

A sync has a coordinator and pushers. The coordinator (:class:`WeightUpdater`, on the trainer rank
that holds the engines: rank 0) pauses and flushes every engine, describes the sync in a small
:class:`SyncPlan`, and at the end finishes it and resumes the engines, in a ``finally``. Every
trainer rank that owns tensors (``parallel/export.py``) pushes its own share with a
:class:`~luspo_megatron.rollout.push.ShardPusher` and returns a :class:`ShardReport`; a rank that
owns nothing sends nothing. The trainer moves the plan and the reports between its ranks
(``trainer/weights.py``); in one process :meth:`WeightUpdater.sync` does all three steps.

    updater = WeightUpdater(pool, mode="disk", weights_dir="runs/x/rollout_weights", config_dir=hf_dir)
    updater.sync(policy_weights, "7")      # (HF name, tensor) stream → every worker, version "7"

- ``disk``: the coordinator makes a staging directory next to ``weights_dir``; every owning rank
  writes its own safetensors shards into it at once; once every report is in, the coordinator
  writes ``model.safetensors.index.json``, publishes the directory by rename (a failed or crashed
  writer means nothing is published) and posts ``/update_weights_from_disk`` to every worker;
- ``distributed``: every owning rank has its own update group with the engines, set up on the
  first sync (and again when the workers change or a sync failed): trainer rank = group rank 0,
  engine GPU r of worker w = ``rank_offset_w + r``, world = 1 + the engines' GPUs
  (:func:`engine_ranks`). Per bucket it posts names/dtypes/shapes to ``/update_weights_from_distributed``
  and broadcasts the tensors; a :class:`~luspo_megatron.rollout.weight_sync.TicketLock` lets one
  rank at a time do so (SGLang receives one broadcast at a time);
- ``tensor`` (colocated engines): every owning rank posts its buckets to ``/update_weights_from_tensor``.

Every update carries the new weight version. A failure anywhere is a :class:`RolloutError` naming
the server; the workers are resumed whatever fails.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import torch
import torch.distributed as dist

from luspo_megatron.errors import RolloutError
from luspo_megatron.rollout import weight_sync
from luspo_megatron.rollout.engine import WeightStream
from luspo_megatron.rollout.push import ShardPusher
from luspo_megatron.rollout.sync_plan import GroupPlan, ShardReport, SyncPlan, engine_ranks
from luspo_megatron.rollout.weight_sync import Bucket
from luspo_megatron.rollout.workers import WorkerPool, check_all, describe

log = logging.getLogger("luspo_megatron.rollout")
WEIGHT_SYNC_MODES = ("disk", "distributed", "tensor")


class WeightUpdater:
    """The coordinator of the syncs to the workers of a :class:`WorkerPool` (module docstring).

    ``master`` = (``--update-weight-master-addr``, ``--update-weight-master-port``): where the
    engines reach the owning ranks' update groups (rank r: port + r); None: each owning rank's own
    address toward the engines, a free port.
    """

    def __init__(self, pool: WorkerPool, mode: str = "disk", *, weights_dir: str | Path | None = None,
                 config_dir: str | Path | None = None, bucket_bytes: int = 512 * 1024**2,
                 master: tuple[str | None, int | None] = (None, None),
                 on_published: Callable[[Path, str], None] | None = None, timeout_s: float = 600.0) -> None:
        if mode not in WEIGHT_SYNC_MODES:
            raise RolloutError(f"weight_sync: expected one of {WEIGHT_SYNC_MODES}, got {mode!r}")
        self.pool, self.mode, self.bucket_bytes = pool, mode, bucket_bytes
        self.weights_dir = Path(weights_dir) if weights_dir is not None else None
        self.config_dir = Path(config_dir) if config_dir is not None else None
        self.master, self.timeout_s = master, timeout_s
        self.on_published = on_published  # e.g. a supervisor: what a restarted server must load
        self.backend = "nccl" if torch.cuda.is_available() else "gloo"
        self.group_prefix = f"luspo-{uuid.uuid4().hex[:8]}"  # this coordinator's groups: never an old name
        self.pusher = ShardPusher(0, pool)  # this process's own share when it is the whole trainer
        self._sync_ids = itertools.count(1)
        self._generation, self._group_key, self._groups_broken = 0, None, False
        self._store: dist.TCPStore | None = None
        self._lock_host = os.environ.get("MASTER_ADDR", "127.0.0.1")

    # ------------------------------------------------------------------------------ one process
    def sync(self, weights: WeightStream, weight_version: str) -> None:
        """A whole sync when this process is the whole trainer: begin, push everything, end."""
        plan = self.begin(weight_version)
        self.end(plan, [self.pusher.push(plan, weights)])

    def from_disk(self, path: str | os.PathLike, weight_version: str) -> None:
        """Point every worker at a complete HF directory (paused around it)."""
        plan = self.begin(weight_version, mode="disk", stage=False)
        ok = False
        try:
            self._load_from_disk(plan, Path(path))
            ok = True
        finally:
            self._resume(plan, failed=not ok)

    def from_tensor(self, buckets: Iterable[Bucket], weight_version: str) -> None:
        """The tensor path with buckets given by the caller (one process)."""
        self._direct("tensor", buckets, weight_version)

    def from_distributed(self, buckets: Iterable[Bucket], weight_version: str) -> None:
        """The distributed path with buckets given by the caller (one process)."""
        self._direct("distributed", buckets, weight_version)

    def init_group(self, master_address: str, master_port: int | None = None, *, group_name: str | None = None,
                   backend: str | None = None, timeout_s: float | None = None) -> None:
        """Where the next distributed sync makes its update group (it is made then, with the engines)."""
        self.master, self.group_prefix = (master_address, master_port), group_name or self.group_prefix
        self.backend = backend or self.backend
        self.timeout_s = timeout_s or self.timeout_s
        self._groups_broken = True

    def destroy_group(self) -> None:
        """Destroy this process's update group on the engines and here."""
        self.pusher.close_group()

    def _direct(self, mode: str, buckets: Iterable[Bucket], weight_version: str) -> None:
        plan = self.begin(weight_version, mode=mode)
        self.end(plan, [self.pusher.push(plan, (item for bucket in buckets for item in bucket))])

    # -------------------------------------------------------------------------------- coordinator
    def begin(self, weight_version: str, *, mode: str | None = None, stage: bool = True) -> SyncPlan:
        """Pause and flush every worker, then describe the sync. On failure the workers are
        resumed and a :class:`RolloutError` names the server."""
        mode = mode or self.mode
        urls = tuple(self.pool.worker_urls)  # behind a router: the workers it lists now
        plan = SyncPlan(mode, str(weight_version), next(self._sync_ids), urls,
                        tuple((k, v) for k, v in self.pool.session.headers.items()), self.bucket_bytes)
        ok = False
        try:
            self.pool.call(self._each(urls, "/pause_generation", {"mode": "abort"}))
            self.pool.call(self._flush(urls))
            if mode == "disk" and stage:
                if self.weights_dir is None or self.config_dir is None:
                    raise RolloutError("weight_sync disk: the engine needs weights_dir and config_dir")
                plan = dataclasses.replace(plan, stage_dir=str(weight_sync.stage_dir(self.weights_dir)))
            elif mode == "tensor":
                infos = self.pool.call(self._infos(urls))
                plan = dataclasses.replace(plan, tp_sizes=tuple(int(i.get("tp_size", 1) or 1) for i in infos))
            elif mode == "distributed":
                plan = dataclasses.replace(plan, groups=self._group_plan(urls))
            ok = True
            return plan
        finally:
            if not ok:
                self._resume(plan, failed=True)

    def end(self, plan: SyncPlan, reports: list[ShardReport]) -> None:
        """Finish the sync from every rank's report (disk: publish and load), then resume the
        workers; a :class:`RolloutError` if any rank or server failed."""
        ok = False
        try:
            errors = [r.error for r in reports if r.error]
            if errors:
                raise RolloutError(errors[0])
            if not sum(r.tensors for r in reports):
                raise RolloutError("weight sync: no trainer rank exported a tensor")
            if plan.mode == "disk":
                path = self._publish(plan, reports)
                self._load_from_disk(plan, path)
                if self.on_published is not None:
                    self.on_published(path, plan.version)
            ok = True
        finally:
            if plan.stage_dir is not None and Path(plan.stage_dir).exists():
                shutil.rmtree(plan.stage_dir, ignore_errors=True)  # published: renamed away; else discarded
            self._groups_broken |= not ok and plan.mode == "distributed"
            self._resume(plan, failed=not ok)

    def _publish(self, plan: SyncPlan, reports: list[ShardReport]) -> Path:
        assert self.weights_dir is not None and self.config_dir is not None and plan.stage_dir is not None
        try:
            return weight_sync.publish_shards(plan.stage_dir, self.weights_dir, [r.weight_map for r in reports],
                                              self.config_dir)
        except (OSError, ValueError) as err:
            raise RolloutError(f"weight_sync disk: publishing {self.weights_dir}: {err}") from None

    def _load_from_disk(self, plan: SyncPlan, path: Path) -> None:
        body = {"model_path": str(path.resolve()), "weight_version": plan.version}
        self.pool.call(self._each(plan.urls, "/update_weights_from_disk", body))

    def _resume(self, plan: SyncPlan, failed: bool) -> None:
        """``/continue_generation`` to every worker. After a failure, a worker that cannot be
        resumed is logged (the first error is the one raised)."""
        try:
            self.pool.call(self._each(plan.urls, "/continue_generation", {}))
        except RolloutError as err:
            if not failed:
                raise
            log.warning("weight sync failed, and resuming the workers failed too: %s", err)

    def _group_plan(self, urls: tuple[str, ...]) -> GroupPlan:
        infos = self.pool.call(self._infos(urls))
        sizes = [engine_ranks(u, i) for u, i in zip(urls, infos)]
        offsets = tuple(itertools.accumulate([1] + sizes[:-1]))  # engine w starts after the trainer and engines < w
        key = (urls, tuple(sizes), self.master, self.backend, self.group_prefix)
        if key != self._group_key or self._groups_broken:
            self._generation += 1
            self._group_key, self._groups_broken = key, False
        if self._store is None:  # the lock's store lives as long as the coordinator
            self._store = dist.TCPStore(self._lock_host, 0, is_master=True, wait_for_workers=False)
        return GroupPlan(self._generation, 1 + sum(sizes), offsets, self.backend, self.master[0], self.master[1],
                         (self._lock_host, self._store.port), self.timeout_s, self.group_prefix)

    # ------------------------------------------------------------------------------------- HTTP
    async def _each(self, urls: Iterable[str], path: str, body: dict[str, Any]) -> None:
        """POST to every worker at once; the first failure (HTTP or connection) names its server."""
        urls = list(urls)
        results = await asyncio.gather(*(self.pool.post(u, path, body, self.timeout_s) for u in urls),
                                       return_exceptions=True)
        check_all(urls, path, results)

    async def _flush(self, urls: Iterable[str]) -> None:
        """``/flush_cache`` on every worker, retried while it answers 400 (requests still in flight)."""
        async def one(url: str) -> None:
            for _ in range(self.pool.flush_retries):
                try:
                    status, answer = await self.pool.post(url, "/flush_cache")
                except (TimeoutError, aiohttp.ClientError) as err:
                    raise RolloutError(f"{url}/flush_cache: {describe(err)}") from None
                if status == 200:
                    return
                if status != 400:
                    raise RolloutError(f"{url}/flush_cache: HTTP {status}: {str(answer)[:200]}")
                await asyncio.sleep(self.pool.flush_retry_s)
            raise RolloutError(f"{url}/flush_cache: still busy (HTTP 400) after {self.pool.flush_retries} tries")
        await asyncio.gather(*(one(u) for u in urls))

    async def _infos(self, urls: Iterable[str]) -> list[dict[str, Any]]:
        async def one(url: str) -> dict[str, Any]:
            try:
                return await self.pool.server_info(url)
            except RolloutError:
                raise
            except (TimeoutError, aiohttp.ClientError) as err:
                raise RolloutError(f"{url}/server_info: {describe(err)}") from None
        return list(await asyncio.gather(*(one(u) for u in urls)))
