"""Small HTTP stand-ins with real sockets, for what the real sglang-router 0.3.2 (tests/rollout/
real_router.py, used everywhere else) cannot play: a router of the 0.2.x API (``/add_worker``,
``/list_workers``; 0.3.2 answers those with 404) that proxies ``/generate``, and an "old SGLang"
proxy without ``/model_info`` (sglang < 0.5.9)."""

from __future__ import annotations

import asyncio
import itertools
import threading
import uuid
from collections import Counter

import aiohttp
from aiohttp import web

from luspo_megatron.runtime.distributed import free_port


class _Background:
    """Serves an aiohttp app on a free port from a thread with its own event loop."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.calls: Counter[str] = Counter()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def app(self) -> web.Application:
        raise NotImplementedError

    def __enter__(self):
        self._thread.start()

        async def start():
            self._session = aiohttp.ClientSession()
            self._runner = web.AppRunner(self.app())
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        asyncio.run_coroutine_threadsafe(start(), self._loop).result()
        return self

    def __exit__(self, *exc) -> None:
        async def stop():
            await self._session.close()
            await self._runner.cleanup()
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()

    async def forward(self, request: web.Request, target: str) -> web.Response:
        body = await request.read()
        async with self._session.request(request.method, f"{target}{request.path_qs}", data=body,
                                         headers={"Content-Type": "application/json"}) as resp:
            return web.Response(status=resp.status, body=await resp.read(),
                                content_type=resp.content_type, charset=resp.charset)


class LegacyRouter(_Background):
    """sglang-router ≤ 0.2.1: ``POST /add_worker?url=``, ``POST /remove_worker?url=``, ``GET /list_workers``;
    no ``/workers`` routes (404, which sends the client to the 0.2.x form)."""

    def __init__(self) -> None:
        super().__init__()
        self.workers: dict[str, str] = {}  # id -> url
        self._rr = itertools.count()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._count])
        app.router.add_post("/add_worker", self.add_legacy)
        app.router.add_post("/remove_worker", self.remove_legacy)
        app.router.add_get("/list_workers", self.list_legacy)
        app.router.add_post("/generate", self.generate)
        app.router.add_get("/health", self.health)
        return app

    async def health(self, request):
        return web.Response(status=200)

    @web.middleware
    async def _count(self, request, handler):
        self.calls[f"{request.method} {request.path}"] += 1
        return await handler(request)

    async def add_legacy(self, request):
        self.workers[uuid.uuid4().hex[:8]] = request.query["url"]
        return web.Response(text="ok")

    async def remove_legacy(self, request):
        for worker_id, url in list(self.workers.items()):
            if url == request.query["url"]:
                del self.workers[worker_id]
        return web.Response(text="ok")

    async def list_legacy(self, request):
        return web.json_response({"urls": list(self.workers.values())})

    async def generate(self, request):
        urls = list(self.workers.values())
        if not urls:
            return web.json_response({"error": "no workers"}, status=503)
        return await self.forward(request, urls[next(self._rr) % len(urls)])


class OldSGLang(_Background):
    """Forwards everything to a server but hides /model_info and /server_info (sglang < 0.5.9)."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target

    def app(self) -> web.Application:
        async def handle(request):
            self.calls[request.path] += 1
            if request.path in ("/model_info", "/server_info"):
                return web.Response(status=404)
            return await self.forward(request, self.target)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app
