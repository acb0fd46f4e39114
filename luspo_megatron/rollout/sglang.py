"""SGLang HTTP client (sglang ≥ 0.5): rollouts, health, control and weight sync.

    engine = SGLangEngine(["http://10.0.0.5:30000", "http://10.0.0.6:30000"])   # load-balanced
    engine = SGLangEngine.from_router("http://10.0.0.4:30000")                   # or one sglang-router
    groups = engine.generate(prompt_ids, SamplingParams(max_new_tokens=1024), n=8)  # [P][G] Samples

Rollouts are token-in/token-out ``/generate`` calls with ``return_logprob`` and ``no_stop_trim``
(``protocol.py``), run concurrently on an asyncio loop that the engine owns (a background
thread, so the trainer stays synchronous). At most ``max_concurrency`` requests are in flight per
server; a new request goes to the server with the fewest. A 5xx, 408/429, a connection error, a
timeout or an aborted output is retried with exponential backoff up to ``max_retries`` times,
preferably on another server, then raised as :class:`RolloutError` naming the server and the prompt
index. A 4xx or a malformed answer is raised at once. No sample is ever dropped: ``generate``
returns exactly ``n`` samples per prompt or raises.

Behind a router, ``/generate`` goes through the router and control calls (pause, flush, weight
updates) go to each worker it lists. Weight sync (DESIGN.md §4 step 7) is pause → flush_cache
(retried while it answers 400) → update (disk, distributed or tensor) → continue, with the new
weight version sent in every update call.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import random
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import torch

from luspo_megatron.errors import RolloutError
from luspo_megatron.rollout import protocol, weight_sync
from luspo_megatron.rollout.engine import FINISH_ABORT, Sample, SamplingParams
from luspo_megatron.rollout.router import RouterClient

log = logging.getLogger("luspo_megatron.rollout")
Bucket = list[tuple[str, torch.Tensor]]
_RETRY_STATUS = (408, 429)


class _Retryable(Exception):
    """A failure worth another attempt (5xx, connection, timeout, abort)."""


@dataclass
class _Server:
    url: str
    semaphore: asyncio.Semaphore
    in_flight: int = 0


class SGLangEngine:
    """The :class:`~luspo_megatron.rollout.engine.RolloutEngine` for SGLang's HTTP API.

    Construction waits (up to ``startup_timeout_s``) until every server answers
    ``/health_generate`` with 200, then reads ``/model_info``. ``routed_layout=(num_layers,
    top_k)`` asks for ``return_routed_experts`` and decodes it into ``Sample.routed_experts``.
    ``weight_sync`` picks what :meth:`update_weights` does with tensor buckets. ``api_key`` goes
    out as ``Authorization: Bearer`` on every request (generate, health, info, control, weight sync,
    the router's worker list), as sglang's ``--api-key`` expects.
    """

    def __init__(
        self, urls: list[str], *, router_url: str | None = None, max_concurrency: int = 64,
        request_timeout_s: float = 600.0, max_retries: int = 5, backoff_s: float = 0.5, max_backoff_s: float = 10.0,
        startup_timeout_s: float | None = 600.0, health_poll_s: float = 0.5, flush_retries: int = 60,
        flush_retry_s: float = 1.0, api_key: str | None = None, routed_layout: tuple[int, int] | None = None,
        weight_sync: str = "disk",
    ) -> None:
        if not urls and not router_url:
            raise RolloutError("SGLangEngine: expected at least one server URL or a router URL")
        if weight_sync not in ("disk", "distributed", "tensor"):
            raise RolloutError(f"weight_sync: expected disk, distributed or tensor, got {weight_sync!r}")
        self.max_concurrency, self.request_timeout_s, self.max_retries = max_concurrency, request_timeout_s, max_retries
        self.backoff_s, self.max_backoff_s, self.health_poll_s = backoff_s, max_backoff_s, health_poll_s
        self.flush_retries, self.flush_retry_s, self.routed_layout = flush_retries, flush_retry_s, routed_layout
        self.weight_sync = weight_sync
        # How long a retry waits for a refused (down) server to come back: its start-up budget.
        self.restart_wait_s = startup_timeout_s if startup_timeout_s is not None else 600.0
        self.retries = 0  # failed attempts that were retried, over the engine's life (observability)
        self.router_url = router_url.rstrip("/") if router_url else None
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._group: weight_sync.UpdateGroup | None = None
        self._rr = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sglang-client", daemon=True)
        self._thread.start()
        try:
            self._call(self._setup([u.rstrip("/") for u in urls]))
            if startup_timeout_s is not None:
                self.wait_healthy(startup_timeout_s)
                self.model_info = self._call(self._model_info(self.worker_urls[0]))
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_router(cls, url: str, **kwargs: Any) -> SGLangEngine:
        """Use one sglang-router: traffic through it, control calls to the workers it lists."""
        return cls([], router_url=url, **kwargs)

    async def _setup(self, urls: list[str]) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), headers=self._headers, raise_for_status=False,
        )
        if self.router_url:
            self.router = RouterClient(self.router_url, self._session)
            workers = [w["url"].rstrip("/") for w in await self.router.list_workers()]
            if not workers:
                raise RolloutError(f"router {self.router_url}: lists no workers")
            self.worker_urls = urls or workers
            # One generation target, the router; it may take what all its workers can hold.
            self._servers = [_Server(self.router_url, asyncio.Semaphore(self.max_concurrency * len(workers)))]
        else:
            self.router = None
            self.worker_urls = urls
            self._servers = [_Server(u, asyncio.Semaphore(self.max_concurrency)) for u in urls]

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        """Close the HTTP session and stop the event loop thread."""
        if not self._loop.is_running():
            return
        session = getattr(self, "_session", None)
        if session is not None:
            self._call(session.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> SGLangEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --------------------------------------------------------------------------------- generate
    def generate(self, prompts: list[list[int]], sampling: SamplingParams, n: int) -> list[list[Sample]]:
        """``out[i][j]``: sample j of prompt i. Exactly ``n`` per prompt, or a RolloutError."""
        return self._call(self.agenerate(prompts, sampling, n))

    async def agenerate(self, prompts: list[list[int]], sampling: SamplingParams, n: int) -> list[list[Sample]]:
        if n < 1:
            raise RolloutError(f"n: expected ≥ 1 samples per prompt, got {n}")
        out: list[list[Sample | None]] = [[None] * n for _ in prompts]

        async def group(i: int, prompt: list[int]) -> None:
            out[i][:] = await self._request(i, prompt, protocol.sampling_params_json(sampling, n, None), n)

        async def single(i: int, j: int, prompt: list[int]) -> None:
            seed = protocol.sample_seed(sampling.seed, i, j)
            out[i][j] = (await self._request(i, prompt, protocol.sampling_params_json(sampling, 1, seed), 1))[0]

        if sampling.seed is None:  # one request per prompt, n samples (SGLang's parallel sampling)
            jobs = [group(i, p) for i, p in enumerate(prompts)]
        else:  # a seed per sample: sglang would give n identical samples for one seed (protocol.sample_seed)
            jobs = [single(i, j, p) for i, p in enumerate(prompts) for j in range(n)]
        tasks = [asyncio.ensure_future(job) for job in jobs]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return out  # type: ignore[return-value]

    def _pick(self, avoid: _Server | None) -> _Server:
        candidates = [s for s in self._servers if s is not avoid] or self._servers
        least = min(s.in_flight for s in candidates)
        tied = [s for s in candidates if s.in_flight == least]
        return tied[next(self._rr) % len(tied)]

    async def _request(self, index: int, prompt: list[int], params: dict[str, Any], count: int) -> list[Sample]:
        body = protocol.generate_request(prompt, params, return_routed_experts=self.routed_layout is not None)
        server: _Server | None = None
        for attempt in range(self.max_retries + 1):
            server = self._pick(avoid=server)
            server.in_flight += 1
            try:
                async with server.semaphore:
                    return await self._post_generate(server, index, prompt, body, count)
            except (TimeoutError, _Retryable, aiohttp.ClientError) as err:
                reason = _describe(err)
                refused = isinstance(err, aiohttp.ClientConnectorError)
                if attempt == self.max_retries:
                    raise RolloutError(
                        f"{server.url}/generate failed for prompt {index}: {reason} "
                        f"(after {attempt + 1} attempts)"
                    ) from None
                self.retries += 1
                log.warning("%s/generate, prompt %d: %s; retry %d/%d", server.url, index, reason, attempt + 1,
                            self.max_retries)
            finally:
                server.in_flight -= 1
            delay = min(self.backoff_s * 2**attempt, self.max_backoff_s)
            await asyncio.sleep(delay * random.uniform(0.75, 1.25))  # jitter: retries do not stampede
            if refused and len(self._servers) == 1:
                # Nothing listens: the only server is down, perhaps being restarted (a supervisor, a
                # crashed SGLang worker brought back). Backoff alone (≈ 15 s over 5 retries) is shorter
                # than a start-up on a loaded machine, so wait for it to be healthy again first.
                with contextlib.suppress(RolloutError):
                    await self._wait_url_healthy(server.url, self.restart_wait_s)
        raise AssertionError("unreachable")

    async def _post_generate(
        self, server: _Server, index: int, prompt: list[int], body: dict[str, Any], count: int
    ) -> list[Sample]:
        timeout = aiohttp.ClientTimeout(total=self.request_timeout_s)
        async with self._session.post(f"{server.url}/generate", json=body, timeout=timeout) as resp:
            if resp.status >= 500 or resp.status in _RETRY_STATUS:
                raise _Retryable(f"HTTP {resp.status}: {(await resp.text())[:200]}")
            if resp.status != 200:
                raise RolloutError(f"{server.url}/generate rejected prompt {index}: HTTP {resp.status}"
                                   f"{_auth_hint(resp.status)}: {(await resp.text())[:300]}")
            data = await resp.json(content_type=None)
        outputs = data if isinstance(data, list) else [data]
        if len(outputs) != count:
            raise RolloutError(f"{server.url}/generate returned {len(outputs)} outputs for prompt {index}, "
                               f"expected {count}")
        try:
            samples = [protocol.parse_output(o, prompt, routed_layout=self.routed_layout) for o in outputs]
        except RolloutError as err:
            raise RolloutError(f"{server.url}/generate, prompt {index}: {err}") from None
        aborted = [s for s in samples if s.finish == FINISH_ABORT]
        if aborted:
            message = aborted[0].meta.get("finish_reason", {}).get("message", "")
            raise _Retryable(f"aborted ({message})" if message else "aborted")
        return samples

    # ----------------------------------------------------------------------------- health, info
    def wait_healthy(self, timeout_s: float = 600.0) -> None:
        """Poll ``/health_generate`` on every worker until all answer 200 (SGLang's start-up check)."""
        self._call(self._wait_healthy(timeout_s))

    async def _wait_healthy(self, timeout_s: float) -> None:
        await asyncio.gather(*(self._wait_url_healthy(u, timeout_s) for u in self.worker_urls))

    async def _wait_url_healthy(self, url: str, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        last = "no answer"
        while loop.time() < deadline:
            try:
                status, _ = await self._get(url, "/health_generate", timeout_s=min(30.0, timeout_s))
                if status == 200:
                    return
                last = f"HTTP {status}"
            except (TimeoutError, aiohttp.ClientError) as err:
                last = _describe(err)
            await asyncio.sleep(self.health_poll_s)
        raise RolloutError(f"{url}/health_generate: not healthy within {timeout_s:.0f} s (last: {last})")

    def health(self) -> bool:
        """True when every worker answers ``/health_generate`` with 200 now."""
        async def check() -> bool:
            async def one(url: str) -> bool:
                try:
                    return (await self._get(url, "/health_generate", timeout_s=30.0))[0] == 200
                except (TimeoutError, aiohttp.ClientError):
                    return False
            return all(await asyncio.gather(*(one(u) for u in self.worker_urls)))
        return self._call(check())

    async def _model_info(self, url: str) -> dict[str, Any]:
        return await self._info(url, "/model_info", "/get_model_info")

    async def _server_info(self, url: str) -> dict[str, Any]:
        return await self._info(url, "/server_info", "/get_server_info")

    async def _info(self, url: str, path: str, legacy: str) -> dict[str, Any]:
        status, body = await self._get(url, path)
        if status in (404, 405):  # sglang < 0.5.9 has only the /get_* form
            status, body = await self._get(url, legacy)
        if status != 200 or not isinstance(body, dict):
            raise RolloutError(f"{url}{path}: HTTP {status}{_auth_hint(status)}")
        return body

    def weight_version(self) -> str:
        """``model_info.weight_version`` of the workers (they must agree)."""
        async def read() -> str:
            infos = await asyncio.gather(*(self._model_info(u) for u in self.worker_urls))
            versions = {str(i.get("weight_version", "default")) for i in infos}
            if len(versions) != 1:
                raise RolloutError(f"workers disagree on weight_version: {sorted(versions)}")
            return versions.pop()
        return self._call(read())

    # ----------------------------------------------------------------------------- control calls
    async def _get(self, url: str, path: str, timeout_s: float = 60.0) -> tuple[int, Any]:
        async with self._session.get(f"{url}{path}", timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            return resp.status, await _body(resp)

    async def _post(self, url: str, path: str, body: Any = None, timeout_s: float = 600.0) -> tuple[int, Any]:
        async with self._session.post(f"{url}{path}", json=body if body is not None else {},
                                      timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            return resp.status, await _body(resp)

    async def _post_all(self, path: str, body: Any = None, timeout_s: float = 600.0) -> None:
        """POST to every worker; raise if any answers non-200 or ``success: false``."""
        results = await asyncio.gather(*(self._post(u, path, body, timeout_s) for u in self.worker_urls))
        for url, (status, answer) in zip(self.worker_urls, results):
            _check_control(url, path, status, answer)

    def pause(self) -> None:
        """``/pause_generation`` (mode abort): in-flight requests come back aborted and are retried."""
        self._call(self._post_all("/pause_generation", {"mode": "abort"}))

    def resume(self) -> None:
        self._call(self._post_all("/continue_generation", {}))

    def flush_cache(self) -> None:
        self._call(self._flush_all())

    async def _flush_all(self) -> None:
        async def one(url: str) -> None:
            for _ in range(self.flush_retries):
                status, answer = await self._post(url, "/flush_cache")
                if status == 200:
                    return
                if status != 400:  # 400: requests still in flight; anything else is an error
                    raise RolloutError(f"{url}/flush_cache: HTTP {status}{_auth_hint(status)}: {str(answer)[:200]}")
                await asyncio.sleep(self.flush_retry_s)
            raise RolloutError(f"{url}/flush_cache: still busy (HTTP 400) after {self.flush_retries} tries")
        await asyncio.gather(*(one(u) for u in self.worker_urls))

    def abort_all(self) -> None:
        self._call(self._post_all("/abort_request", {"abort_all": True}))

    # ------------------------------------------------------------------------------- weight sync
    def update_weights(self, source: str | os.PathLike | Iterable[Bucket], weight_version: str) -> None:
        """A directory: ``/update_weights_from_disk``. Buckets of (hf_name, tensor): the engine's
        ``weight_sync`` path ("distributed" needs :meth:`init_weights_update_group` first)."""
        if isinstance(source, (str, os.PathLike)):
            self.update_weights_from_disk(source, weight_version)
        elif self.weight_sync == "tensor":
            self.update_weights_from_tensor(source, weight_version)
        elif self.weight_sync == "distributed":
            self.update_weights_from_distributed(source, weight_version)
        else:
            raise RolloutError("weight_sync disk: pass the directory written by weight_sync.write_hf_checkpoint")

    def _synced(self, update) -> None:
        async def run() -> None:
            await self._post_all("/pause_generation", {"mode": "abort"})
            try:
                await self._flush_all()
                await update()
            finally:
                await self._post_all("/continue_generation", {})
        self._call(run())

    def update_weights_from_disk(self, path: str | os.PathLike, weight_version: str) -> None:
        """Point every worker at a complete HF directory (write it with ``weight_sync.write_hf_checkpoint``)."""
        body = {"model_path": str(Path(path).resolve()), "weight_version": str(weight_version)}
        self._synced(lambda: self._post_all("/update_weights_from_disk", body))

    def update_weights_from_tensor(self, buckets: Iterable[Bucket], weight_version: str) -> None:
        """Colocated engines: each bucket pickled (CUDA-IPC handles for CUDA tensors), one entry per
        engine TP rank."""
        async def update() -> None:
            tp = {u: int((await self._server_info(u)).get("tp_size", 1)) for u in self.worker_urls}
            for bucket in buckets:
                entry = weight_sync.serialize_named_tensors(bucket)
                results = await asyncio.gather(*(
                    self._post(u, "/update_weights_from_tensor", {
                        "serialized_named_tensors": [entry] * tp[u], "flush_cache": False,
                        "weight_version": str(weight_version)})
                    for u in self.worker_urls))
                for url, (status, answer) in zip(self.worker_urls, results):
                    _check_control(url, "/update_weights_from_tensor", status, answer)
        self._synced(update)

    def init_weights_update_group(
        self, master_address: str, master_port: int, *, group_name: str = "luspo-weights", backend: str = "nccl",
        timeout_s: float = 600.0,
    ) -> None:
        """Create the broadcast group: this process is rank 0, engine GPU r of worker w joins as
        ``rank_offset_w + r`` (``rank_offset`` = 1 + GPUs of the workers before it)."""
        async def init() -> None:
            infos = [await self._server_info(u) for u in self.worker_urls]
            sizes = [int(i.get("tp_size", 1)) * int(i.get("pp_size", 1)) * int(i.get("dp_size", 1)) for i in infos]
            world = 1 + sum(sizes)
            offsets = list(itertools.accumulate([1] + sizes[:-1]))
            # SGLang's call blocks until we join too: send the requests, then join, then read them.
            posts = [asyncio.ensure_future(self._post(u, "/init_weights_update_group", {
                "master_address": master_address, "master_port": master_port, "rank_offset": off,
                "world_size": world, "group_name": group_name, "backend": backend}, timeout_s))
                for u, off in zip(self.worker_urls, offsets)]
            try:
                self._group = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: weight_sync.UpdateGroup(master_address, master_port, 0, world, group_name, backend,
                                                          timeout_s))
            finally:
                results = await asyncio.gather(*posts, return_exceptions=True)
            _check_all(self.worker_urls, "/init_weights_update_group", results)
        self._call(init())

    def update_weights_from_distributed(self, buckets: Iterable[Bucket], weight_version: str) -> None:
        """Per bucket: post names/dtypes/shapes to every worker, then broadcast the tensors from
        rank 0 in that order (bucket bytes bound the memory both sides hold at once)."""
        group = self._group
        if group is None:
            raise RolloutError("update_weights_from_distributed: call init_weights_update_group first")
        device = "cpu" if isinstance(group.backend, torch.distributed.ProcessGroupGloo) else "cuda"

        async def update() -> None:
            loop = asyncio.get_running_loop()
            for bucket in buckets:
                tensors = [t.detach().to(device).contiguous() for _, t in bucket]
                meta = {"names": [n for n, _ in bucket], "dtypes": [weight_sync.dtype_name(t.dtype) for t in tensors],
                        "shapes": [list(t.shape) for t in tensors], "group_name": group.name,
                        "flush_cache": False, "weight_version": str(weight_version)}
                posts = [asyncio.ensure_future(self._post(u, "/update_weights_from_distributed", meta))
                         for u in self.worker_urls]
                try:
                    await loop.run_in_executor(None, group.broadcast, tensors)
                finally:
                    results = await asyncio.gather(*posts, return_exceptions=True)
                _check_all(self.worker_urls, "/update_weights_from_distributed", results)
        self._synced(update)

    def destroy_weights_update_group(self) -> None:
        if self._group is None:
            return
        self._call(self._post_all("/destroy_weights_update_group", {"group_name": self._group.name}))
        self._group.close()
        self._group = None


async def _body(resp: aiohttp.ClientResponse) -> Any:
    text = await resp.text()
    if "json" in resp.headers.get("Content-Type", ""):
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def _check_control(url: str, path: str, status: int, answer: Any) -> None:
    if status != 200 or (isinstance(answer, dict) and answer.get("success") is False):
        message = answer.get("message") if isinstance(answer, dict) else str(answer)
        raise RolloutError(f"{url}{path}: HTTP {status}{_auth_hint(status)}: {str(message)[:300]}")


def _auth_hint(status: int) -> str:
    """What a 401 means: the server wants an API key (``api_key=``, the trainer's --sglang-api-key)."""
    return " (the server requires an API key: --sglang-api-key)" if status == 401 else ""


def _check_all(urls: list[str], path: str, results: list) -> None:
    """Per worker, a (status, answer) pair or the exception its post raised (asyncio.gather with
    return_exceptions): the first failure becomes a RolloutError naming the worker."""
    for url, result in zip(urls, results):
        if isinstance(result, BaseException):
            raise RolloutError(f"{url}{path}: {_describe(result)}")
        _check_control(url, path, *result)


def _describe(err: BaseException) -> str:
    if isinstance(err, asyncio.TimeoutError):
        return "timed out"
    if isinstance(err, _Retryable):
        return str(err)
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
