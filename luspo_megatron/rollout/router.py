"""sglang-router (SGLang Model Gateway) worker registry, both API generations.

≥ 0.3.0: ``POST /workers {"url", "worker_type"}`` (answers 202, queued), ``GET /workers``
(``{"workers": [{"id", "url", ...}], ...}``), ``DELETE /workers/{id}``.
≤ 0.2.1: ``POST /add_worker?url=``, ``POST /remove_worker?url=``, ``GET /list_workers`` (``{"urls"}``).
Each call tries the 0.3.x form first and falls back to 0.2.x when the route is missing (404/405).
"""

from __future__ import annotations

import asyncio
import urllib.parse

import aiohttp

from luspo_megatron.errors import RolloutError

_MISSING = (404, 405)


class RouterClient:
    """Register, list and remove workers of one router. Async; share the caller's session."""

    def __init__(self, url: str, session: aiohttp.ClientSession, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def list_workers(self) -> list[dict]:
        """``[{"id": str | None, "url": str}, ...]``."""
        async with self.session.get(f"{self.url}/workers", timeout=self.timeout) as resp:
            if resp.status == 200:
                body = await resp.json()
                return [{"id": w.get("id"), "url": w["url"]} for w in body.get("workers", [])]
            if resp.status not in _MISSING:
                raise RolloutError(f"router {self.url}: GET /workers answered HTTP {resp.status}")
        async with self.session.get(f"{self.url}/list_workers", timeout=self.timeout) as resp:
            if resp.status != 200:
                raise RolloutError(f"router {self.url}: neither /workers nor /list_workers answered "
                                   f"(HTTP {resp.status})")
            body = await resp.json()
            return [{"id": None, "url": u} for u in body.get("urls", [])]

    async def add_worker(self, worker_url: str, wait_s: float = 30.0) -> None:
        """Register ``worker_url`` and wait until the router lists it (0.3.x queues the add)."""
        async with self.session.post(f"{self.url}/workers", json={"url": worker_url, "worker_type": "regular"},
                                     timeout=self.timeout) as resp:
            status = resp.status
        if status in _MISSING:
            query = urllib.parse.urlencode({"url": worker_url})
            async with self.session.post(f"{self.url}/add_worker?{query}", timeout=self.timeout) as resp:
                status = resp.status
        if status not in (200, 201, 202):
            raise RolloutError(f"router {self.url}: adding worker {worker_url} answered HTTP {status}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while worker_url not in [w["url"] for w in await self.list_workers()]:
            if loop.time() > deadline:
                raise RolloutError(f"router {self.url}: worker {worker_url} not listed {wait_s:.0f} s after adding")
            await asyncio.sleep(0.1)

    async def remove_worker(self, worker_url: str) -> None:
        for worker in await self.list_workers():
            if worker["url"] == worker_url and worker["id"] is not None:
                async with self.session.delete(f"{self.url}/workers/{worker['id']}", timeout=self.timeout) as resp:
                    if resp.status in (200, 202, 204):
                        return
                    raise RolloutError(f"router {self.url}: DELETE /workers/{worker['id']} answered "
                                       f"HTTP {resp.status}")
        query = urllib.parse.urlencode({"url": worker_url})
        async with self.session.post(f"{self.url}/remove_worker?{query}", timeout=self.timeout) as resp:
            if resp.status != 200:
                raise RolloutError(f"router {self.url}: removing worker {worker_url} answered HTTP {resp.status}")


def _sync(method: str, router_url: str, *args) -> object:
    async def run():
        async with aiohttp.ClientSession() as session:
            return await getattr(RouterClient(router_url, session), method)(*args)
    return asyncio.run(run())


def register_worker(router_url: str, worker_url: str) -> None:
    """Blocking :meth:`RouterClient.add_worker` (e.g. after starting a local server)."""
    _sync("add_worker", router_url, worker_url)


def unregister_worker(router_url: str, worker_url: str) -> None:
    """Blocking :meth:`RouterClient.remove_worker`."""
    _sync("remove_worker", router_url, worker_url)


def list_workers(router_url: str) -> list[dict]:
    """Blocking :meth:`RouterClient.list_workers`."""
    return _sync("list_workers", router_url)  # type: ignore[return-value]
