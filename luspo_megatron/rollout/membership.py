"""Keeping every worker of a fleet on the weights pushed last, as workers come and go.

    keeper = WeightKeeper(pool)           # pool: a WorkerPool (behind a router, or a fixed list)
    pool.call(keeper.admit())             # before a rollout: re-read the router, catch up new workers
    keeper.synced("7")                    # after every successful sync

A sync reaches the workers the router lists at its start (``WorkerPool.arefresh``). A worker that
appears between syncs, or comes back on its first weights (a restart), would serve old weights.
:meth:`WeightKeeper.admit` runs before every rollout: each worker whose ``weight_version`` is not
the expected one (the last push; before any push, what the workers started with) is brought up to
date before a request is sent:

- the last push was a disk sync: it loads that directory at once (pause → flush → update →
  continue, on that worker only);
- otherwise (distributed, tensor: the weights exist only in the trainer), behind a router it is
  taken out of the router (held back) and stays addressed by control calls, so the next sync
  updates it; :meth:`WeightKeeper.synced` then gives it back to the router. With a fixed list of
  URLs it is logged; the trainer's sample check (``versions.py``) refuses what it would serve.

A worker that does not answer is left to the client's retries and the next sync.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from luspo_megatron.rollout.workers import WorkerPool

log = logging.getLogger("luspo_megatron.rollout")


class WeightKeeper:
    """The version every worker of ``pool`` should hold, and what brings a worker to it."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.expected_version: str | None = None  # None: not known (the workers disagreed at start)
        self.published: tuple[Path, str] | None = None  # the directory of the last disk sync, its version

    async def start(self) -> None:
        """The workers' weights at start are the expected ones when they all agree."""
        versions = set((await self.pool.versions(self.pool.worker_urls)).values())
        self.expected_version = versions.pop() if len(versions) == 1 else None

    def published_at(self, path: str | Path, weight_version: str) -> None:
        """A disk sync published ``weight_version`` in ``path``."""
        self.published = (Path(path).resolve(), str(weight_version))

    def synced(self, weight_version: str) -> None:
        """Every worker (the held back included) holds ``weight_version`` now: give the held-back
        ones back to the router."""
        self.expected_version = str(weight_version)
        if self.pool.held_back:
            self.pool.call(self._release())

    async def admit(self) -> None:
        """Re-read the router's workers; bring each that does not hold the expected version up to
        date before it serves (module docstring)."""
        pool = self.pool
        await pool.arefresh()
        urls = [u for u in pool.worker_urls if u not in pool.held_back]
        if self.expected_version is None or not urls:
            return
        answers = await asyncio.gather(*(pool.versions([u]) for u in urls), return_exceptions=True)
        stale = [u for u, a in zip(urls, answers) if isinstance(a, dict) and a[u] != self.expected_version]
        for url in stale:
            if self.published is not None and self.published[1] == self.expected_version:
                body = {"model_path": str(self.published[0]), "weight_version": self.expected_version}
                await pool.paused(lambda u=url, b=body: pool.post_all("/update_weights_from_disk", b, urls=[u]),
                                  urls=[url])
                log.warning("worker %s held other weights than version %s: it loaded them from %s before serving",
                            url, self.expected_version, self.published[0])
            elif pool.follows_router:
                assert pool.router is not None
                await pool.router.remove_worker(url)
                pool.held_back.append(url)
                log.warning("worker %s holds other weights than version %s: taken out of the router until the "
                            "next weight sync updates it", url, self.expected_version)
            else:
                log.warning("worker %s holds other weights than version %s until the next weight sync", url,
                            self.expected_version)

    async def _release(self) -> None:
        pool = self.pool
        assert pool.router is not None
        while pool.held_back:
            url = pool.held_back[0]
            await pool.router.add_worker(url, api_key=pool.api_key)
            pool.held_back.pop(0)
            log.info("router %s: worker %s is back, with version %s", pool.router_url, url, self.expected_version)
