"""Small HTTP stand-ins with real sockets: an sglang-router (0.3.x ``/workers`` API, or the 0.2.x
``/add_worker`` API) that proxies ``/generate``, and an "old SGLang" proxy without ``/model_info``."""

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


class FakeRouter(_Background):
    """``legacy=False``: sglang-router ≥ 0.3 (POST /workers answers 202 and adds the worker a moment
    later; DELETE /workers/{id}). ``legacy=True``: ≤ 0.2.1 (/add_worker?url=, /list_workers)."""

    def __init__(self, legacy: bool = False) -> None:
        super().__init__()
        self.legacy = legacy
        self.workers: dict[str, str] = {}  # id -> url
        self._rr = itertools.count()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._count])
        if self.legacy:
            app.router.add_post("/add_worker", self.add_legacy)
            app.router.add_post("/remove_worker", self.remove_legacy)
            app.router.add_get("/list_workers", self.list_legacy)
        else:
            app.router.add_post("/workers", self.add)
            app.router.add_get("/workers", self.list)
            app.router.add_delete("/workers/{worker_id}", self.remove)
        app.router.add_post("/generate", self.generate)
        app.router.add_get("/health", self.health)
        return app

    async def health(self, request):
        return web.Response(status=200)

    @web.middleware
    async def _count(self, request, handler):
        self.calls[f"{request.method} {request.path}"] += 1
        return await handler(request)

    async def add(self, request):
        body = await request.json()
        worker_id = uuid.uuid4().hex[:8]
        # 0.3.x queues the registration and answers 202 before the worker is listed.
        asyncio.get_running_loop().call_later(0.2, self.workers.__setitem__, worker_id, body["url"])
        return web.json_response({"status": "accepted", "worker_id": worker_id}, status=202)

    async def list(self, request):
        workers = [{"id": i, "url": u, "worker_type": "regular", "is_healthy": True, "load": 0}
                   for i, u in self.workers.items()]
        return web.json_response({"workers": workers, "total": len(workers),
                                  "stats": {"prefill_count": 0, "decode_count": 0, "regular_count": len(workers)}})

    async def remove(self, request):
        if self.workers.pop(request.match_info["worker_id"], None) is None:
            return web.json_response({"error": "no such worker"}, status=404)
        return web.json_response({"status": "removed"}, status=202)

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
