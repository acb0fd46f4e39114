"""The HTTP side of a set of SGLang servers: one session, the workers' URLs, and what every worker gets.

    pool = WorkerPool(["http://10.0.0.5:30000", "http://10.0.0.6:30000"])   # or router_url="http://…"
    pool.wait_healthy(600)
    pool.call(pool.paused(update))          # pause → flush → update → continue (continue whatever fails)

One aiohttp session runs on an event loop that the pool owns (a background thread), so callers stay
synchronous; :meth:`call` runs a coroutine there. Behind a router, the workers are the URLs the
router lists (control calls go to each worker, never through the router). The calls that every
worker must answer with 200 (and no ``success: false``) raise a :class:`RolloutError` naming the
worker that failed.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from luspo_megatron.errors import RolloutError
from luspo_megatron.rollout.router import RouterClient


class Retryable(Exception):
    """A failed attempt worth another (5xx, 408/429, connection, timeout, an aborted output)."""


class WorkerPool:
    """HTTP session, event-loop thread and worker list of SGLang servers (or of one sglang-router)."""

    def __init__(self, urls: list[str], *, router_url: str | None = None, api_key: str | None = None,
                 health_poll_s: float = 0.5, flush_retries: int = 60, flush_retry_s: float = 1.0) -> None:
        if not urls and not router_url:
            raise RolloutError("SGLangEngine: expected at least one server URL or a router URL")
        self.health_poll_s, self.flush_retries, self.flush_retry_s = health_poll_s, flush_retries, flush_retry_s
        self.router_url = router_url.rstrip("/") if router_url else None
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.router: RouterClient | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sglang-client", daemon=True)
        self._thread.start()
        try:
            self.call(self._setup([u.rstrip("/") for u in urls]))
        except BaseException:
            self.close()
            raise

    async def _setup(self, urls: list[str]) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), headers=self._headers, raise_for_status=False,
        )
        self.worker_urls = urls
        if self.router_url:
            self.router = RouterClient(self.router_url, self.session)
            workers = [w["url"].rstrip("/") for w in await self.router.list_workers()]
            if not workers:
                raise RolloutError(f"router {self.router_url}: lists no workers")
            self.worker_urls = urls or workers

    def call(self, coro: Awaitable) -> Any:
        """Run ``coro`` on the pool's event loop and return its result (blocking)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        """Close the HTTP session and stop the event loop thread."""
        if not self._loop.is_running():
            return
        session = getattr(self, "session", None)
        if session is not None:
            self.call(session.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    # ------------------------------------------------------------------------------------- HTTP
    async def get(self, url: str, path: str, timeout_s: float = 60.0) -> tuple[int, Any]:
        async with self.session.get(f"{url}{path}", timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            return resp.status, await _body(resp)

    async def post(self, url: str, path: str, body: Any = None, timeout_s: float = 600.0) -> tuple[int, Any]:
        async with self.session.post(f"{url}{path}", json=body if body is not None else {},
                                     timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            return resp.status, await _body(resp)

    async def post_all(self, path: str, body: Any = None, timeout_s: float = 600.0) -> None:
        """POST to every worker; raise if any answers non-200 or ``success: false``."""
        results = await asyncio.gather(*(self.post(u, path, body, timeout_s) for u in self.worker_urls))
        for url, (status, answer) in zip(self.worker_urls, results):
            check_control(url, path, status, answer)

    # ---------------------------------------------------------------------------- health, info
    def wait_healthy(self, timeout_s: float = 600.0) -> None:
        """Poll ``/health_generate`` on every worker until all answer 200 (SGLang's start-up check)."""
        async def all_healthy() -> None:
            await asyncio.gather(*(self.wait_url_healthy(u, timeout_s) for u in self.worker_urls))
        self.call(all_healthy())

    async def wait_url_healthy(self, url: str, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        last = "no answer"
        while loop.time() < deadline:
            try:
                status, _ = await self.get(url, "/health_generate", timeout_s=min(30.0, timeout_s))
                if status == 200:
                    return
                last = f"HTTP {status}"
            except (TimeoutError, aiohttp.ClientError) as err:
                last = describe(err)
            await asyncio.sleep(self.health_poll_s)
        raise RolloutError(f"{url}/health_generate: not healthy within {timeout_s:.0f} s (last: {last})")

    def health(self) -> bool:
        """True when every worker answers ``/health_generate`` with 200 now."""
        async def one(url: str) -> bool:
            try:
                return (await self.get(url, "/health_generate", timeout_s=30.0))[0] == 200
            except (TimeoutError, aiohttp.ClientError):
                return False

        async def check() -> bool:
            return all(await asyncio.gather(*(one(u) for u in self.worker_urls)))
        return self.call(check())

    async def model_info(self, url: str) -> dict[str, Any]:
        return await self._info(url, "/model_info", "/get_model_info")

    async def server_info(self, url: str) -> dict[str, Any]:
        return await self._info(url, "/server_info", "/get_server_info")

    async def _info(self, url: str, path: str, legacy: str) -> dict[str, Any]:
        status, body = await self.get(url, path)
        if status in (404, 405):  # sglang < 0.5.9 has only the /get_* form
            status, body = await self.get(url, legacy)
        if status != 200 or not isinstance(body, dict):
            raise RolloutError(f"{url}{path}: HTTP {status}{auth_hint(status)}")
        return body

    def weight_version(self) -> str:
        """``model_info.weight_version`` of the workers (they must agree)."""
        async def read() -> str:
            infos = await asyncio.gather(*(self.model_info(u) for u in self.worker_urls))
            versions = {str(i.get("weight_version", "default")) for i in infos}
            if len(versions) != 1:
                raise RolloutError(f"workers disagree on weight_version: {sorted(versions)}")
            return versions.pop()
        return self.call(read())

    # ----------------------------------------------------------------------------- control calls
    def pause(self) -> None:
        """``/pause_generation`` (mode abort): in-flight requests come back aborted and are retried."""
        self.call(self.post_all("/pause_generation", {"mode": "abort"}))

    def resume(self) -> None:
        self.call(self.post_all("/continue_generation", {}))

    def flush_cache(self) -> None:
        self.call(self.flush_all())

    def abort_all(self) -> None:
        self.call(self.post_all("/abort_request", {"abort_all": True}))

    async def flush_all(self) -> None:
        """``/flush_cache`` on every worker, retried while it answers 400 (requests still in flight)."""
        async def one(url: str) -> None:
            for _ in range(self.flush_retries):
                status, answer = await self.post(url, "/flush_cache")
                if status == 200:
                    return
                if status != 400:  # 400: requests still in flight; anything else is an error
                    raise RolloutError(f"{url}/flush_cache: HTTP {status}{auth_hint(status)}: {str(answer)[:200]}")
                await asyncio.sleep(self.flush_retry_s)
            raise RolloutError(f"{url}/flush_cache: still busy (HTTP 400) after {self.flush_retries} tries")
        await asyncio.gather(*(one(u) for u in self.worker_urls))

    async def paused(self, update: Callable[[], Awaitable[None]]) -> None:
        """Pause every worker, flush, ``await update()``, then continue (continue also on failure)."""
        await self.post_all("/pause_generation", {"mode": "abort"})
        try:
            await self.flush_all()
            await update()
        finally:
            await self.post_all("/continue_generation", {})


async def _body(resp: aiohttp.ClientResponse) -> Any:
    text = await resp.text()
    if "json" in resp.headers.get("Content-Type", ""):
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def check_control(url: str, path: str, status: int, answer: Any) -> None:
    if status != 200 or (isinstance(answer, dict) and answer.get("success") is False):
        message = answer.get("message") if isinstance(answer, dict) else str(answer)
        raise RolloutError(f"{url}{path}: HTTP {status}{auth_hint(status)}: {str(message)[:300]}")


def auth_hint(status: int) -> str:
    """What a 401 means: the server wants an API key (``api_key=``, the trainer's --sglang-api-key)."""
    return " (the server requires an API key: --sglang-api-key)" if status == 401 else ""


def check_all(urls: list[str], path: str, results: list) -> None:
    """Per worker, a (status, answer) pair or the exception its post raised (asyncio.gather with
    return_exceptions): the first failure becomes a RolloutError naming the worker."""
    for url, result in zip(urls, results):
        if isinstance(result, BaseException):
            raise RolloutError(f"{url}{path}: {describe(result)}")
        check_control(url, path, *result)


def describe(err: BaseException) -> str:
    """One line for a failed HTTP attempt."""
    if isinstance(err, asyncio.TimeoutError):
        return "timed out"
    if isinstance(err, Retryable):
        return str(err)
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
