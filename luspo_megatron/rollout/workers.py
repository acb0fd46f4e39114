"""The HTTP side of a set of SGLang servers: one session, the workers' URLs, and what every worker gets.

    pool = WorkerPool(["http://10.0.0.5:30000", "http://10.0.0.6:30000"])   # or router_url="http://…"
    pool.wait_healthy(600)
    pool.call(pool.paused(update))          # pause → flush → update → continue (continue whatever fails)

One aiohttp session runs on an event loop that the pool owns (a background thread), so callers stay
synchronous; :meth:`call` runs a coroutine there. Behind a router, the workers are the URLs the
router lists, re-read (:meth:`WorkerPool.refresh_workers`) before every pause, flush, abort and
update, so a worker added to the router later is paused, flushed and updated with the others, and
a removed one is no longer addressed; control calls go to each worker, never through the router.
Every URL is normalised (``router.normalize_url``).

A control call is sent to every worker even when one fails; any failure (connection refused,
timeout, HTTP 4xx/5xx, ``success: false``) is a :class:`RolloutError` naming that worker. Once
workers are paused, every reachable one is resumed (``/continue_generation`` in a ``finally`` that
tolerates the unreachable ones), whatever failed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from luspo_megatron.errors import RolloutError
from luspo_megatron.rollout.router import RouterClient, normalize_url

log = logging.getLogger("luspo_megatron.rollout")


class Retryable(Exception):
    """A failed attempt worth another (5xx, 408/429, connection, timeout, an aborted output)."""


class WorkerPool:
    """HTTP session, event-loop thread and worker list of SGLang servers (or of one sglang-router)."""

    def __init__(self, urls: list[str], *, router_url: str | None = None, api_key: str | None = None,
                 health_poll_s: float = 0.5, flush_retries: int = 60, flush_retry_s: float = 1.0,
                 router_wait_s: float = 0.0) -> None:
        if not urls and not router_url:
            raise RolloutError("SGLangEngine: expected at least one server URL or a router URL")
        self.health_poll_s, self.flush_retries, self.flush_retry_s = health_poll_s, flush_retries, flush_retry_s
        self.router_url = normalize_url(router_url) if router_url else None
        self.api_key = api_key
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.router: RouterClient | None = None
        # Behind a router (and no explicit URLs), the workers are whatever it lists now.
        self.follows_router = bool(router_url) and not urls
        # Workers taken out of the router until the next weight sync brings them up to date
        # (membership.WeightKeeper: one that joined between syncs and cannot be caught up at once).
        self.held_back: list[str] = []
        urls = [normalize_url(u) for u in urls]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sglang-client", daemon=True)
        self._thread.start()
        try:
            self.call(self._setup(urls, router_wait_s))
        except BaseException:
            self.close()
            raise

    async def _setup(self, urls: list[str], router_wait_s: float) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), headers=self._headers, raise_for_status=False,
        )
        self.worker_urls: list[str] = urls
        if self.router_url:
            self.router = RouterClient(self.router_url, self.session)
            await first_workers(self, router_wait_s)

    # ------------------------------------------------------------------------------ membership
    async def arefresh(self) -> list[str]:
        """Behind a router: the workers it lists now (plus those held back), in its order. Returns
        the workers that were not in the list before. Without a router: nothing changes."""
        if not self.follows_router:
            return []
        assert self.router is not None
        listed = [w["url"] for w in await self.router.list_workers()]
        urls = list(dict.fromkeys(listed + self.held_back))
        if not urls:
            raise RolloutError(f"router {self.router_url}: lists no workers")
        before = getattr(self, "worker_urls", [])
        added = [u for u in urls if u not in before]
        removed = [u for u in before if u not in urls]
        if before and (added or removed):
            log.info("router %s: workers added %s, removed %s", self.router_url, added, removed)
        self.worker_urls = urls
        return added

    def refresh_workers(self) -> list[str]:
        """Blocking :meth:`arefresh`."""
        return self.call(self.arefresh())

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
        return await _request(self.session.get, url, path, None, timeout_s)

    async def post(self, url: str, path: str, body: Any = None, timeout_s: float = 600.0) -> tuple[int, Any]:
        return await _request(self.session.post, url, path, {} if body is None else body, timeout_s)

    async def post_all(self, path: str, body: Any = None, timeout_s: float = 600.0,
                       urls: list[str] | None = None) -> None:
        """POST to every worker (or ``urls``), all of them even when one fails; then raise a
        RolloutError naming the first that failed (no answer, non-200 or ``success: false``)."""
        urls = list(self.worker_urls if urls is None else urls)
        results = await asyncio.gather(*(self.post(u, path, body, timeout_s) for u in urls), return_exceptions=True)
        check_all(urls, path, results)

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
        try:
            status, body = await self.get(url, path)
            if status in (404, 405):  # sglang < 0.5.9 has only the /get_* form
                status, body = await self.get(url, legacy)
        except (TimeoutError, aiohttp.ClientError) as err:
            raise RolloutError(f"{url}{path}: {describe(err)}") from None
        if status != 200 or not isinstance(body, dict):
            raise RolloutError(f"{url}{path}: HTTP {status}{auth_hint(status)}")
        return body

    def weight_version(self) -> str:
        """``model_info.weight_version`` of the workers (they must agree)."""
        async def read() -> str:
            await self.arefresh()
            versions = await self.versions(self.worker_urls)
            if len(set(versions.values())) != 1:
                raise RolloutError(f"workers disagree on weight_version: {versions}")
            return next(iter(versions.values()))
        return self.call(read())

    async def versions(self, urls: list[str]) -> dict[str, str]:
        """``{url: model_info.weight_version}`` ("default": the weights the server started with)."""
        infos = await asyncio.gather(*(self.model_info(u) for u in urls))
        return {u: str(i.get("weight_version", "default")) for u, i in zip(urls, infos)}

    # ----------------------------------------------------------------------------- control calls
    def pause(self) -> None:
        """``/pause_generation`` (mode abort) on every worker: in-flight requests come back aborted
        and are retried. All or nothing: if one worker fails, the others are resumed and it raises."""
        async def pause() -> None:
            await self.arefresh()
            urls = list(self.worker_urls)
            ok = False
            try:
                await self.post_all("/pause_generation", {"mode": "abort"}, urls=urls)
                ok = True
            finally:
                if not ok:
                    await self.resume_all(urls, failed=True)
        self.call(pause())

    def resume(self) -> None:
        self.call(self.resume_all(list(self.worker_urls)))

    def flush_cache(self) -> None:
        async def flush() -> None:
            await self.arefresh()
            await self.flush_all()
        self.call(flush())

    def abort_all(self) -> None:
        async def abort() -> None:
            await self.arefresh()
            await self.post_all("/abort_request", {"abort_all": True})
        self.call(abort())

    async def flush_all(self, urls: list[str] | None = None) -> None:
        """``/flush_cache`` on every worker, retried while it answers 400 (requests still in flight)."""
        async def one(url: str) -> None:
            for _ in range(self.flush_retries):
                try:
                    status, answer = await self.post(url, "/flush_cache")
                except (TimeoutError, aiohttp.ClientError) as err:
                    raise RolloutError(f"{url}/flush_cache: {describe(err)}") from None
                if status == 200:
                    return
                if status != 400:  # 400: requests still in flight; anything else is an error
                    raise RolloutError(f"{url}/flush_cache: HTTP {status}{auth_hint(status)}: {str(answer)[:200]}")
                await asyncio.sleep(self.flush_retry_s)
            raise RolloutError(f"{url}/flush_cache: still busy (HTTP 400) after {self.flush_retries} tries")
        urls = list(self.worker_urls if urls is None else urls)
        results = await asyncio.gather(*(one(u) for u in urls), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def resume_all(self, urls: list[str], failed: bool = False) -> None:
        """``/continue_generation`` to every worker of ``urls``. After another failure (``failed``),
        a worker that cannot be resumed (dead, unreachable) is logged, not raised: the first error
        is the one the caller sees."""
        try:
            await self.post_all("/continue_generation", {}, urls=urls)
        except RolloutError as err:
            if not failed:
                raise
            log.warning("resuming the workers after a failure: %s", err)

    async def paused(self, update: Callable[[], Awaitable[None]], urls: list[str] | None = None) -> None:
        """Pause every worker (behind a router: as it lists them now; or just ``urls``), flush,
        ``await update()``, then continue every reachable worker whatever failed."""
        if urls is None:
            await self.arefresh()
            urls = list(self.worker_urls)
        ok = False
        try:
            await self.post_all("/pause_generation", {"mode": "abort"}, urls=urls)
            await self.flush_all(urls)
            try:
                await update()
            except (TimeoutError, aiohttp.ClientError) as err:  # a request of update() that got no answer
                raise RolloutError(f"{failed_url(err) or 'weight update'}: {describe(err)}") from None
            ok = True
        finally:
            await self.resume_all(urls, failed=not ok)


async def first_workers(pool: WorkerPool, wait_s: float) -> None:
    """The router's workers at start. The router and its workers may still be starting (they start
    beside the trainer, and 0.3.x lists a worker once its health check passes): wait up to
    ``wait_s`` for it to answer and list one."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        try:
            await pool.arefresh()
            return
        except RolloutError as err:
            if loop.time() >= deadline:
                raise RolloutError(f"{err} (waited {wait_s:.0f} s)" if wait_s else str(err)) from None
        await asyncio.sleep(pool.health_poll_s)


async def _request(method: Callable, url: str, path: str, body: Any, timeout_s: float) -> tuple[int, Any]:
    """(HTTP status, parsed body). A request that gets no answer raises as aiohttp does, with the
    server's URL attached (``server_url``) so that whoever reports it can name the server."""
    kwargs = {} if body is None else {"json": body}
    try:
        async with method(f"{url}{path}", timeout=aiohttp.ClientTimeout(total=timeout_s), **kwargs) as resp:
            return resp.status, await _body(resp)
    except (TimeoutError, aiohttp.ClientError) as err:
        err.server_url = url
        raise


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


def failed_url(err: BaseException) -> str | None:
    """The server a failed request went to: attached by :meth:`WorkerPool.post` / ``get``, or said
    by the error itself (aiohttp's connection errors carry host and port)."""
    if getattr(err, "server_url", None):
        return err.server_url
    host, port = getattr(err, "host", None), getattr(err, "port", None)
    if not isinstance(host, str) or not host or port is None:
        return None
    scheme = "https" if getattr(err, "ssl", None) not in (None, False, True) or port == 443 else "http"
    return normalize_url(f"{scheme}://{host}:{port}")


def describe(err: BaseException) -> str:
    """One line for a failed HTTP attempt."""
    if isinstance(err, asyncio.TimeoutError):
        return "timed out"
    if isinstance(err, Retryable):
        return str(err)
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
