"""SGLang HTTP client (sglang ≥ 0.5): rollouts, health, control and weight sync.

    engine = SGLangEngine(["http://10.0.0.5:30000", "http://10.0.0.6:30000"])   # load-balanced
    engine = SGLangEngine.from_router("http://10.0.0.4:30000")                   # or one sglang-router
    groups = engine.generate(prompt_ids, SamplingParams(max_new_tokens=1024), n=8)  # [P][G] Samples
    engine.sync_weights(policy_weights, "7")                                     # (HF name, tensor) stream

Rollouts are token-in/token-out ``/generate`` calls with ``return_logprob`` and ``no_stop_trim``
(``protocol.py``), run concurrently on the event loop of a :class:`~luspo_megatron.rollout.workers.WorkerPool`
(a background thread, so the trainer stays synchronous). At most ``max_concurrency`` requests are in
flight per server; a new request goes to the server with the fewest. A 5xx, 408/429, a connection
error, a timeout or an aborted output is retried with exponential backoff up to ``max_retries``
times, preferably on another server, then raised as :class:`RolloutError` naming the server and the
prompt index. A 4xx or a malformed answer is raised at once. No sample is ever dropped: ``generate``
returns exactly ``n`` samples per prompt or raises.

Behind a router, ``/generate`` goes through the router and control calls (pause, flush, weight
updates) go to each worker it lists, re-read before every generate, pause, flush, abort and sync
(``workers.py``). Before every rollout, a worker that does not hold the weights pushed last (it
joined the router since, or restarted) is brought up to date before any request is sent
(``membership.py``: it loads the last disk sync at once, or is held out of the router until the
next sync), so it never serves old weights. Weight sync (docs/design.md §4 step 7) is
:class:`~luspo_megatron.rollout.updates.WeightUpdater`: pause → flush_cache → update (disk,
distributed or tensor) → continue, with the new weight version sent in every update call.

With ``routed_layout`` (routing replay), a ``/generate`` answer without ``routed_experts`` is a
RolloutError naming the likely cause: sglang-router rebuilds each ``/generate`` body and drops
``return_routed_experts`` (0.3.2 does), or the SGLang server runs without
``--enable-return-routed-experts``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from luspo_megatron.errors import RolloutError
from luspo_megatron.rollout import protocol
from luspo_megatron.rollout.engine import FINISH_ABORT, Sample, SamplingParams, WeightStream
from luspo_megatron.rollout.membership import WeightKeeper
from luspo_megatron.rollout.sync_plan import ShardReport, SyncPlan
from luspo_megatron.rollout.updates import WeightUpdater
from luspo_megatron.rollout.weight_sync import Bucket
from luspo_megatron.rollout.workers import Retryable, WorkerPool, auth_hint, describe

log = logging.getLogger("luspo_megatron.rollout")
_RETRY_STATUS = (408, 429)


@dataclass
class _Server:
    url: str
    semaphore: asyncio.Semaphore
    limit: int
    in_flight: int = 0


class SGLangEngine:
    """The :class:`~luspo_megatron.rollout.engine.RolloutEngine` for SGLang's HTTP API.

    Construction waits (up to ``startup_timeout_s``) until the router lists a worker (when given
    one) and every server answers ``/health_generate`` with 200, then reads ``/model_info``.
    ``routed_layout=(num_layers, top_k)`` asks for ``return_routed_experts`` and decodes it into
    ``Sample.routed_experts``.
    ``weight_sync`` (+ ``weights_dir``, ``config_dir`` for disk; ``update_master`` for
    distributed) picks how :meth:`sync_weights` pushes weights (``rollout/updates.py``).
    ``api_key`` goes out as ``Authorization: Bearer`` on every request (generate, health, info,
    control, weight sync, the router's worker list), as sglang's ``--api-key`` expects.
    """

    def __init__(
        self, urls: list[str], *, router_url: str | None = None, max_concurrency: int = 64,
        request_timeout_s: float = 600.0, max_retries: int = 5, backoff_s: float = 0.5, max_backoff_s: float = 10.0,
        startup_timeout_s: float | None = 600.0, health_poll_s: float = 0.5, flush_retries: int = 60,
        flush_retry_s: float = 1.0, api_key: str | None = None, routed_layout: tuple[int, int] | None = None,
        weight_sync: str = "disk", weights_dir: str | Path | None = None, config_dir: str | Path | None = None,
        bucket_bytes: int = 512 * 1024**2, update_master: tuple[str | None, int | None] = (None, None),
        on_weights_published: Callable[[Path, str], None] | None = None,
    ) -> None:
        self.max_concurrency, self.request_timeout_s, self.max_retries = max_concurrency, request_timeout_s, max_retries
        self.backoff_s, self.max_backoff_s, self.routed_layout = backoff_s, max_backoff_s, routed_layout
        # How long a retry waits for a refused (down) server to come back: its start-up budget.
        self.restart_wait_s = startup_timeout_s if startup_timeout_s is not None else 600.0
        self.retries = 0  # failed attempts that were retried, over the engine's life (observability)
        self.counters: dict[str, Callable[[], float]] = {}  # extra metrics (e.g. a supervisor's restarts)
        self._rr = itertools.count()
        self.pool = WorkerPool(urls, router_url=router_url, api_key=api_key, health_poll_s=health_poll_s,
                               flush_retries=flush_retries, flush_retry_s=flush_retry_s,
                               router_wait_s=startup_timeout_s or 0.0)
        self.keeper = WeightKeeper(self.pool)  # every worker on the weights pushed last
        self._on_weights_published = on_weights_published
        try:
            self.updater = WeightUpdater(self.pool, weight_sync, weights_dir=weights_dir, config_dir=config_dir,
                                         bucket_bytes=bucket_bytes, master=update_master,
                                         on_published=self._published_hook)
            self._servers: list[_Server] = []
            self._retarget()
            if startup_timeout_s is not None:
                self.pool.wait_healthy(startup_timeout_s)
                self.model_info = self.pool.call(self.pool.model_info(self.pool.worker_urls[0]))
                self.pool.call(self.keeper.start())
        except BaseException:
            self.pool.close()
            raise

    @classmethod
    def from_router(cls, url: str, **kwargs: Any) -> SGLangEngine:
        """Use one sglang-router: traffic through it, control calls to the workers it lists."""
        return cls([], router_url=url, **kwargs)

    @property
    def worker_urls(self) -> list[str]:
        return self.pool.worker_urls

    @property
    def router(self):
        return self.pool.router

    def close(self) -> None:
        """Close the HTTP session and stop the event loop thread."""
        self.pool.close()

    def __enter__(self) -> SGLangEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --------------------------------------------------------------------------------- generate
    def generate(self, prompts: list[list[int]], sampling: SamplingParams, n: int) -> list[list[Sample]]:
        """``out[i][j]``: sample j of prompt i. Exactly ``n`` per prompt, or a RolloutError."""
        self.pool.call(self.keeper.admit())
        self._retarget()
        return self.pool.call(self.agenerate(prompts, sampling, n))

    # -------------------------------------------------------------------------- fleet membership
    def _retarget(self) -> None:
        """One generation target per worker, or the router, which may take what all its workers can
        hold (remade when that changes; between generate calls, so nothing waits on the old ones)."""
        router = self.pool.router_url
        targets = [router] if router else self.pool.worker_urls
        limit = self.max_concurrency * (len(self.pool.worker_urls) if router else 1)
        if [(s.url, s.limit) for s in self._servers] != [(u, limit) for u in targets]:
            # asyncio primitives bind to the running loop on first use (Python ≥ 3.10): made here, used there.
            self._servers = [_Server(u, asyncio.Semaphore(limit), limit) for u in targets]

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
            except (TimeoutError, Retryable, aiohttp.ClientError) as err:
                reason = describe(err)
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
                    await self.pool.wait_url_healthy(server.url, self.restart_wait_s)
        raise AssertionError("unreachable")

    async def _post_generate(
        self, server: _Server, index: int, prompt: list[int], body: dict[str, Any], count: int
    ) -> list[Sample]:
        timeout = aiohttp.ClientTimeout(total=self.request_timeout_s)
        async with self.pool.session.post(f"{server.url}/generate", json=body, timeout=timeout) as resp:
            if resp.status >= 500 or resp.status in _RETRY_STATUS:
                raise Retryable(f"HTTP {resp.status}: {(await resp.text())[:200]}")
            if resp.status != 200:
                raise RolloutError(f"{server.url}/generate rejected prompt {index}: HTTP {resp.status}"
                                   f"{auth_hint(resp.status)}: {(await resp.text())[:300]}")
            data = await resp.json(content_type=None)
        outputs = data if isinstance(data, list) else [data]
        if len(outputs) != count:
            raise RolloutError(f"{server.url}/generate returned {len(outputs)} outputs for prompt {index}, "
                               f"expected {count}")
        try:
            samples = [protocol.parse_output(o, prompt, routed_layout=self.routed_layout) for o in outputs]
        except RolloutError as err:
            raise RolloutError(f"{server.url}/generate, prompt {index}: {err}") from None
        if self.routed_layout is not None and any(s.routed_experts is None and s.finish != FINISH_ABORT
                                                   for s in samples):
            raise RolloutError(no_routed_experts(server.url, index, via_router=server.url == self.pool.router_url))
        aborted = [s for s in samples if s.finish == FINISH_ABORT]
        if aborted:
            message = aborted[0].meta.get("finish_reason", {}).get("message", "")
            raise Retryable(f"aborted ({message})" if message else "aborted")
        return samples

    # ------------------------------------------------------------------- health, control, metrics
    def wait_healthy(self, timeout_s: float = 600.0) -> None:
        """Poll ``/health_generate`` on every worker until all answer 200 (SGLang's start-up check)."""
        self.pool.wait_healthy(timeout_s)

    def health(self) -> bool:
        return self.pool.health()

    def weight_version(self) -> str:
        return self.pool.weight_version()

    def pause(self) -> None:
        self.pool.pause()

    def resume(self) -> None:
        self.pool.resume()

    def flush_cache(self) -> None:
        self.pool.flush_cache()

    def abort_all(self) -> None:
        self.pool.abort_all()

    def metrics(self) -> dict[str, float]:
        return {name: float(read()) for name, read in self.counters.items()}

    # ------------------------------------------------------------------------------- weight sync
    def sync_weights(self, weights: WeightStream, weight_version: str) -> None:
        """Push the policy's (HF name, tensor) stream the configured way (``rollout/updates.py``)."""
        self.pool.refresh_workers()  # every sync starts with the workers the router lists now
        self.updater.sync(weights, weight_version)
        self.keeper.synced(weight_version)  # every successful sync ends here

    def _published_hook(self, path: Path, weight_version: str) -> None:
        self.keeper.published_at(path, weight_version)
        if self._on_weights_published is not None:
            self._on_weights_published(path, weight_version)

    # The sharded protocol of rollout.engine.ShardedWeightSync (trainer/weights.py): rank 0 begins,
    # every rank pushes its share (rollout/push.py), rank 0 ends.
    def begin_weight_sync(self, weight_version: str) -> SyncPlan:
        self.pool.refresh_workers()  # every sync starts with the workers the router lists now
        return self.updater.begin(weight_version)

    def end_weight_sync(self, plan: SyncPlan, reports: list[ShardReport]) -> None:
        self.updater.end(plan, reports)
        self.keeper.synced(plan.version)  # every successful sync ends here

    def update_weights_from_disk(self, path: str | os.PathLike, weight_version: str) -> None:
        self.pool.refresh_workers()
        self.updater.from_disk(path, weight_version)
        self.keeper.published_at(path, weight_version)
        self.keeper.synced(weight_version)

    def update_weights_from_tensor(self, buckets: Iterable[Bucket], weight_version: str) -> None:
        self.pool.refresh_workers()
        self.updater.from_tensor(buckets, weight_version)
        self.keeper.synced(weight_version)

    def init_weights_update_group(self, master_address: str, master_port: int, **kwargs: Any) -> None:
        self.pool.refresh_workers()
        self.updater.init_group(master_address, master_port, **kwargs)

    def update_weights_from_distributed(self, buckets: Iterable[Bucket], weight_version: str) -> None:
        self.updater.from_distributed(buckets, weight_version)
        self.keeper.synced(weight_version)

    def destroy_weights_update_group(self) -> None:
        self.updater.destroy_group()


def no_routed_experts(url: str, index: int, *, via_router: bool) -> str:
    """Why routing replay got no ``routed_experts`` from ``url``: the two likely causes."""
    cause = (f"the router {url} rebuilds each /generate body and drops return_routed_experts (sglang-router 0.3.2 "
             "does): give the trainer the workers themselves (--sglang-url URL ...) instead of --sglang-router, "
             "or " if via_router else "")
    return (f"{url}/generate, prompt {index}: the answer has no routed_experts, which routing replay "
            f"(--use-rollout-routing-replay) needs; {cause}the SGLang server was started without "
            "--enable-return-routed-experts")
