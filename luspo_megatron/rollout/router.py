"""sglang-router (SGLang Model Gateway) worker registry, both API generations, and URL normalisation.

≥ 0.3.0: ``POST /workers {"url", "worker_type", "api_key"?}`` (answers 202: queued), ``GET /workers``
(``{"workers": [{"id", "url", ...}], ...}``), ``DELETE /workers/{id}`` (202: queued).
≤ 0.2.1: ``POST /add_worker?url=``, ``POST /remove_worker?url=``, ``GET /list_workers`` (``{"urls"}``).
Each call tries the 0.3.x form first and falls back to 0.2.x when the route is missing (404/405).
0.3.x queues additions and removals, so :meth:`RouterClient.add_worker` and
:meth:`RouterClient.remove_worker` wait until the router's list shows the change.

Every URL is normalised (:func:`normalize_url`) before it is sent or compared: the router keeps a
worker's URL as given, and 0.3.2 builds its health check as ``url + "/health"``, so a trailing
slash registers a worker that never becomes healthy (``//health`` answers 404).
"""

from __future__ import annotations

import asyncio
import urllib.parse

import aiohttp

from luspo_megatron.errors import RolloutError

_MISSING = (404, 405)


def normalize_url(url: str) -> str:
    """``scheme://host[:port][/path]``: scheme and host lower-case (``http`` when none is given), no
    trailing slash, no query. ``"127.0.0.1:30000/"`` → ``"http://127.0.0.1:30000"``."""
    text = str(url).strip()
    if "://" not in text:
        text = f"http://{text}"
    parts = urllib.parse.urlsplit(text)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise RolloutError(f"server URL: expected http[s]://host:port, got {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise RolloutError(f"server URL: expected a port in [1, 65535], got {url!r}") from None
    host = parts.hostname.lower()
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    return f"{parts.scheme.lower()}://{netloc}{parts.path.rstrip('/')}"


class RouterClient:
    """Register, list and remove workers of one router. Async; share the caller's session."""

    def __init__(self, url: str, session: aiohttp.ClientSession, timeout_s: float = 30.0) -> None:
        self.url = normalize_url(url)
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def list_workers(self) -> list[dict]:
        """``[{"id": str | None, "url": str}, ...]``, URLs normalised. A router that cannot be
        reached or answers an error is a RolloutError naming it."""
        try:
            async with self.session.get(f"{self.url}/workers", timeout=self.timeout) as resp:
                if resp.status == 200:
                    body = await resp.json(content_type=None)
                    return [{"id": w.get("id"), "url": normalize_url(w["url"])} for w in body.get("workers", [])]
                if resp.status not in _MISSING:
                    raise RolloutError(f"router {self.url}: GET /workers answered HTTP {resp.status}")
            async with self.session.get(f"{self.url}/list_workers", timeout=self.timeout) as resp:
                if resp.status != 200:
                    raise RolloutError(f"router {self.url}: neither /workers nor /list_workers answered "
                                       f"(HTTP {resp.status})")
                body = await resp.json(content_type=None)
                return [{"id": None, "url": normalize_url(u)} for u in body.get("urls", [])]
        except (TimeoutError, aiohttp.ClientError) as err:
            raise RolloutError(f"router {self.url}: listing its workers failed: {type(err).__name__}: {err}") from None

    async def listed(self, worker_url: str) -> bool:
        return normalize_url(worker_url) in [w["url"] for w in await self.list_workers()]

    async def add_worker(self, worker_url: str, wait_s: float = 60.0, api_key: str | None = None) -> None:
        """Register ``worker_url`` and wait until the router lists it (0.3.x queues the add and lists
        a worker only once its health check passed). ``api_key``: the key the worker requires."""
        worker_url = normalize_url(worker_url)
        body = {"url": worker_url, "worker_type": "regular", **({"api_key": api_key} if api_key else {})}
        async with self.session.post(f"{self.url}/workers", json=body, timeout=self.timeout) as resp:
            status = resp.status
        if status in _MISSING:
            query = urllib.parse.urlencode({"url": worker_url})
            async with self.session.post(f"{self.url}/add_worker?{query}", timeout=self.timeout) as resp:
                status = resp.status
        if status not in (200, 201, 202):
            raise RolloutError(f"router {self.url}: adding worker {worker_url} answered HTTP {status}")
        await self._wait_until(worker_url, listed=True, wait_s=wait_s)

    async def remove_worker(self, worker_url: str, wait_s: float = 60.0) -> None:
        """Deregister ``worker_url`` and wait until the router no longer lists it."""
        worker_url = normalize_url(worker_url)
        for worker in await self.list_workers():
            if worker["url"] == worker_url and worker["id"] is not None:
                async with self.session.delete(f"{self.url}/workers/{worker['id']}", timeout=self.timeout) as resp:
                    if resp.status not in (200, 202, 204):
                        raise RolloutError(f"router {self.url}: DELETE /workers/{worker['id']} answered "
                                           f"HTTP {resp.status}")
                break
        else:
            query = urllib.parse.urlencode({"url": worker_url})
            async with self.session.post(f"{self.url}/remove_worker?{query}", timeout=self.timeout) as resp:
                if resp.status not in (200, *_MISSING):  # missing: 0.3.x, and the worker was not listed
                    raise RolloutError(f"router {self.url}: removing worker {worker_url} answered HTTP {resp.status}")
        await self._wait_until(worker_url, listed=False, wait_s=wait_s)

    async def _wait_until(self, worker_url: str, *, listed: bool, wait_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while await self.listed(worker_url) != listed:
            if loop.time() > deadline:
                state = "not listed" if listed else "still listed"
                raise RolloutError(f"router {self.url}: worker {worker_url} {state} {wait_s:.0f} s after "
                                   f"{'adding' if listed else 'removing'} it")
            await asyncio.sleep(0.1)


def _sync(method: str, router_url: str, *args, router_key: str | None = None, **kwargs) -> object:
    async def run():
        headers = {"Authorization": f"Bearer {router_key}"} if router_key else {}
        async with aiohttp.ClientSession(headers=headers) as session:
            return await getattr(RouterClient(router_url, session), method)(*args, **kwargs)
    return asyncio.run(run())


def register_worker(router_url: str, worker_url: str, *, wait_s: float = 60.0, api_key: str | None = None,
                    worker_api_key: str | None = None) -> None:
    """Blocking :meth:`RouterClient.add_worker` (e.g. after starting a local server). ``api_key``:
    the router's own key; ``worker_api_key``: the key the worker requires (the router sends it)."""
    _sync("add_worker", router_url, worker_url, wait_s=wait_s, router_key=api_key, api_key=worker_api_key)


def unregister_worker(router_url: str, worker_url: str, *, wait_s: float = 60.0, api_key: str | None = None) -> None:
    """Blocking :meth:`RouterClient.remove_worker`."""
    _sync("remove_worker", router_url, worker_url, wait_s=wait_s, router_key=api_key)


def list_workers(router_url: str, *, api_key: str | None = None) -> list[dict]:
    """Blocking :meth:`RouterClient.list_workers`."""
    return _sync("list_workers", router_url, router_key=api_key)  # type: ignore[return-value]
