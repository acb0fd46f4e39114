"""One trainer rank's share of a weight sync: its own (HF name, tensor) stream to the engines.

    pusher = ShardPusher(rank)                       # one per process; keeps its HTTP session and group
    report = pusher.push(plan, policy.hf_weights())  # a ShardReport; never raises for a failed sync

The stream is cut into ``--update-weight-buffer-size`` buckets and sent the plan's way
(``rollout/updates.py``): written as this rank's safetensors shards (disk), posted to every engine
(tensor), or broadcast through this rank's own update group (distributed). The stream is a
collective of the exporter (``parallel/export.py``): it is always iterated to the end, also after
a failure (then without sending), so that no other rank is left waiting in a gather. A failure is
returned in the report, naming the server, and in distributed mode also announced to the other
owning ranks through the lock's store, so that they stop sending too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from luspo_megatron.errors import RolloutError
from luspo_megatron.rollout import weight_sync
from luspo_megatron.rollout.engine import WeightStream
from luspo_megatron.rollout.sync_plan import ShardReport, SyncPlan, this_host
from luspo_megatron.rollout.weight_sync import Bucket, TicketLock, UpdateGroup, bucket_by_bytes
from luspo_megatron.rollout.workers import WorkerPool, check_all, describe
from luspo_megatron.runtime.distributed import free_port

log = logging.getLogger("luspo_megatron.rollout")
POST_GRACE_S = 10.0  # after a failed broadcast: how long the engines' answers may take to name the culprit
DESTROY_TIMEOUT_S = 5.0  # /destroy_weights_update_group of a group being replaced (best effort)


class _OtherRankFailed(Exception):
    """Another owning rank failed this sync: stop sending (its report carries the error)."""


class ShardPusher:
    """Pushes one rank's tensors (module docstring). ``pool``: an existing HTTP pool to reuse (the
    coordinator's, in one process); otherwise one is made on first use for the plan's workers."""

    def __init__(self, rank: int, pool: WorkerPool | None = None) -> None:
        self.rank = rank
        self._pool, self._own_pool = pool, False
        self._store: dist.TCPStore | None = None
        self._store_addr: tuple[str, int] | None = None
        self.group: UpdateGroup | None = None
        self._group_key: tuple | None = None
        self._group_urls: tuple[str, ...] = ()
        self._abandoned = False  # a broadcast or join of self.group was left running in its thread
        self._graveyard: list[UpdateGroup] = []

    # -------------------------------------------------------------------------------------- push
    def push(self, plan: SyncPlan, weights: WeightStream) -> ShardReport:
        report = ShardReport(self.rank)
        stream = iter(weights)
        buckets = _counted(bucket_by_bytes(stream, plan.bucket_bytes), report)
        try:
            if plan.mode == "disk":
                assert plan.stage_dir is not None
                report.weight_map = weight_sync.write_shards(buckets, plan.stage_dir, f"model-rank{self.rank:05d}")
            elif plan.mode == "tensor":
                self._tensor(plan, buckets)
            else:
                self._distributed(plan, buckets)
        except _OtherRankFailed:
            pass
        except RolloutError as err:
            report.error = str(err)
        except Exception as err:  # a disk error, a broken group, a bug: the sync fails on every rank
            log.exception("weight sync, rank %d", self.rank)
            report.error = f"weight sync, trainer rank {self.rank}: {type(err).__name__}: {err}"
        if report.error is not None and plan.groups is not None:
            self._announce_failure(plan, report.error)
        for _ in stream:  # keep the exporter's collectives in step with the other ranks
            pass
        return report

    def close(self) -> None:
        self.close_group()
        if self._own_pool and self._pool is not None:
            self._pool.close()
            self._pool = None

    # ------------------------------------------------------------------------------------ tensor
    def _tensor(self, plan: SyncPlan, buckets: Iterable[Bucket]) -> None:
        pool = self._http(plan)

        async def post(bucket: Bucket) -> None:
            entry = weight_sync.serialize_named_tensors(bucket)
            path = "/update_weights_from_tensor"
            results = await asyncio.gather(*(pool.post(u, path, {
                "serialized_named_tensors": [entry] * tp, "flush_cache": False, "weight_version": plan.version})
                for u, tp in zip(plan.urls, plan.tp_sizes)), return_exceptions=True)
            check_all(list(plan.urls), path, results)

        for bucket in buckets:
            pool.call(post(bucket))
            del bucket  # before the next bucket is built

    # ------------------------------------------------------------------------------- distributed
    def _distributed(self, plan: SyncPlan, buckets: Iterable[Bucket]) -> None:
        g = plan.groups
        assert g is not None
        pool, store = self._http(plan), self._lock_store(plan)
        prefix = f"sync{plan.sync_id}"
        first = True
        for bucket in buckets:
            with TicketLock(store, prefix, g.timeout_s):
                if store.check([f"{prefix}/failed"]):
                    raise _OtherRankFailed
                try:
                    if first:
                        self._ensure_group(plan, pool)
                        first = False
                    pool.call(self._broadcast(plan, pool, bucket))
                except BaseException as err:
                    store.set(f"{prefix}/failed", str(err)[:500])  # before the next holder looks
                    raise
            del bucket  # before the next bucket is built

    def _ensure_group(self, plan: SyncPlan, pool: WorkerPool) -> None:
        """This rank's update group with the plan's engines (made again when the plan's
        generation or workers change; the old one is destroyed on the engines first)."""
        g = plan.groups
        assert g is not None
        key = (g.prefix, g.generation, plan.urls, g.world_size)
        if self.group is not None and self._group_key == key:
            return
        self.close_group()
        name = f"{g.prefix}-g{g.generation}-r{self.rank}"
        host = g.master_addr or this_host(toward=plan.urls[0])
        port = g.master_port + self.rank if g.master_port else free_port(host)
        body = {"master_address": host, "master_port": port, "world_size": g.world_size, "group_name": name,
                "backend": g.backend}

        async def init() -> UpdateGroup:
            posts = [asyncio.ensure_future(pool.post(u, "/init_weights_update_group", {**body, "rank_offset": off},
                                                     g.timeout_s)) for u, off in zip(plan.urls, g.rank_offsets)]
            make = lambda: UpdateGroup(host, port, 0, g.world_size, name, g.backend, g.timeout_s)  # noqa: E731
            return await _with_posts(make, posts, list(plan.urls), "/init_weights_update_group",
                                     f"update group {name} at {host}:{port}", self._abandon)

        self.group = pool.call(init())
        self._group_key, self._group_urls, self._abandoned = key, plan.urls, False

    async def _broadcast(self, plan: SyncPlan, pool: WorkerPool, bucket: Bucket) -> None:
        """Post the bucket's names/dtypes/shapes to every engine, then broadcast its tensors in that order."""
        group = self.group
        assert group is not None and plan.groups is not None
        device = "cpu" if plan.groups.backend == "gloo" else torch.device("cuda", torch.cuda.current_device())
        tensors = [t.detach().to(device).contiguous() for _, t in bucket]
        meta = {"names": [n for n, _ in bucket], "dtypes": [weight_sync.dtype_name(t.dtype) for t in tensors],
                "shapes": [list(t.shape) for t in tensors], "group_name": group.name, "flush_cache": False,
                "weight_version": plan.version}
        path = "/update_weights_from_distributed"
        posts = [asyncio.ensure_future(pool.post(u, path, meta, plan.groups.timeout_s)) for u in plan.urls]
        await _with_posts(lambda: group.broadcast(tensors), posts, list(plan.urls), path,
                          f"broadcast in update group {group.name}", self._abandon)

    def _abandon(self) -> None:
        self._abandoned = True

    def close_group(self) -> None:
        """Destroy this rank's update group here, then on its engines (best effort, briefly).

        Here first: closing our sockets ends any receive an engine is still stuck in for a
        broadcast that failed. A group whose broadcast thread was abandoned mid-call
        (:func:`_with_posts`) is only dropped, never destroyed (its destructor would wait for it)."""
        if self.group is None:
            return
        group, urls, name = self.group, self._group_urls, self.group.name
        self.group, self._group_key = None, None
        if self._abandoned:
            self._graveyard.append(group)
        else:
            group.close()
        self._abandoned = False
        if self._pool is not None and urls:
            async def destroy() -> None:
                await asyncio.gather(*(self._pool.post(u, "/destroy_weights_update_group", {"group_name": name},
                                                       DESTROY_TIMEOUT_S) for u in urls), return_exceptions=True)
            self._pool.call(destroy())

    # ------------------------------------------------------------------------------------ plumbing
    def _http(self, plan: SyncPlan) -> WorkerPool:
        if self._pool is None:
            self._pool, self._own_pool = WorkerPool(list(plan.urls)), True
        if plan.headers:
            self._pool.session.headers.update(dict(plan.headers))  # the coordinator's API key
        return self._pool

    def _lock_store(self, plan: SyncPlan) -> dist.TCPStore:
        assert plan.groups is not None
        if self._store is None or self._store_addr != plan.groups.lock:
            host, port = plan.groups.lock
            self._store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=plan.groups.timeout_s))
            self._store_addr = plan.groups.lock
        return self._store

    def _announce_failure(self, plan: SyncPlan, message: str) -> None:
        try:
            self._lock_store(plan).set(f"sync{plan.sync_id}/failed", message[:500])
        except Exception as err:  # the coordinator's store is gone too: the report still carries the error
            log.warning("could not tell the other ranks that the sync failed: %s", err)


def _counted(buckets: Iterator[Bucket], report: ShardReport) -> Iterator[Bucket]:
    for bucket in buckets:
        report.tensors += len(bucket)
        report.bytes += sum(t.numel() * t.element_size() for _, t in bucket)
        yield bucket
        del bucket  # not kept while the next one is built


async def _with_posts(blocking: Callable[[], Any], posts: list[asyncio.Future], urls: list[str], path: str,
                      what: str, on_abandon: Callable[[], None]) -> Any:
    """Run ``blocking()`` (a group join or broadcast, which needs the engines' side too) in a thread
    while the HTTP requests that make the engines take part are in flight. A request that fails
    first is the error (naming its server), at once: the blocking call would otherwise wait for
    that engine until the group's timeout. It is then left in its daemon thread (``on_abandon``),
    and the group is made again at the next sync."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def run() -> None:
        try:
            result, error = blocking(), None
        except BaseException as err:  # delivered to the event loop below
            result, error = None, err
        with contextlib.suppress(RuntimeError):  # the pool's loop closed meanwhile: nobody waits any more
            loop.call_soon_threadsafe(_settle, done, result, error)

    threading.Thread(target=run, name="weight-sync-collective", daemon=True).start()
    pending: set[asyncio.Future] = {done, *posts}
    try:
        while done in pending:
            finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            _raise_first_failure(finished - {done}, posts, urls, path)
        if done.exception() is not None:
            # Which engine broke it? Its request fails soon (a dead one at once); a live engine
            # still waiting for its share would wait until its group's timeout: do not wait for it.
            deadline = loop.time() + POST_GRACE_S
            while pending and loop.time() < deadline:
                finished, pending = await asyncio.wait(pending, timeout=deadline - loop.time(),
                                                       return_when=asyncio.FIRST_COMPLETED)
                _raise_first_failure(finished, posts, urls, path)
            raise RolloutError(f"{what}: {describe(done.exception())} (engines {', '.join(urls)})")
        results = await asyncio.gather(*posts, return_exceptions=True)
    finally:
        if not done.done():
            on_abandon()
            done.add_done_callback(lambda f: f.cancelled() or f.exception())  # its late outcome: retrieved
        elif not done.cancelled():
            done.exception()  # retrieved: a failed post may have been the error raised
        for post in posts:
            post.cancel()  # no-op for the finished ones
    check_all(urls, path, results)
    return done.result()


def _raise_first_failure(finished: set[asyncio.Future], posts: list[asyncio.Future], urls: list[str],
                         path: str) -> None:
    for post, url in zip(posts, urls):
        if post in finished and _failed(post):
            check_all([url], path, [post.exception() or post.result()])


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


def _failed(post: asyncio.Future) -> bool:
    if post.cancelled():
        return False
    if post.exception() is not None:
        return True
    status, answer = post.result()
    return status != 200 or (isinstance(answer, dict) and answer.get("success") is False)
