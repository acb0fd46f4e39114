"""API-key authentication for our SGLang-API server, as sglang checks it (``sglang/srt/utils/auth.py``).

With a key configured (``--api-key``, or ``$LUSPO_ROLLOUT_API_KEY`` so that a key need not appear
in the process list), every request must carry ``Authorization: Bearer <key>`` (the scheme in any
case) or ``x-api-key: <key>``; otherwise the answer is HTTP 401 ``{"error": "Unauthorized"}``,
before the route is looked up or the body read. As in sglang, ``OPTIONS`` and the paths that start
with ``/health``, ``/ready`` or ``/metrics`` stay open (probes carry no secrets), and the comparison
takes constant time. Without a key every request is allowed, as in sglang.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable

from aiohttp import web

API_KEY_ENV = "LUSPO_ROLLOUT_API_KEY"
OPEN_PREFIXES = ("/health", "/ready", "/metrics")


def authorized(key: str, authorization: str | None, x_api_key: str | None) -> bool:
    """True when the ``Authorization`` or ``x-api-key`` header carries ``key``."""
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(token.encode(), key.encode()):
            return True
    return bool(x_api_key) and secrets.compare_digest(x_api_key.encode(), key.encode())


def api_key_middleware(key: str) -> Callable:
    """An aiohttp middleware that admits only requests carrying ``key`` (module docstring)."""
    assert key, "an empty API key would admit everyone"

    @web.middleware
    async def check(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        if request.method == "OPTIONS" or request.path.startswith(OPEN_PREFIXES):
            return await handler(request)
        if authorized(key, request.headers.get("Authorization"), request.headers.get("x-api-key")):
            return await handler(request)
        return web.json_response({"error": "Unauthorized"}, status=401)

    return check
