"""The batching scheduler of our SGLang-API server: rows in, batches through the model, results out.

Every ``/generate`` becomes rows (one per sample) in a waiting queue. One batch loop takes up to
``max_running`` rows at a time and runs them through ``run_batch`` (the generator: one
``model.generate`` call, KV cache) on a single model thread; rows that arrive meanwhile wait for the
next batch. Weight updates take :attr:`Scheduler.model_lock` and run on the same thread, so they
land between batches, never inside one.

Isolation: a batch that raises is re-run one request at a time (seeded rows sample the same
tokens alone or batched), so only the request that fails answers 500. Aborts and cancellations are
linear in the rows they touch. Rows of a request whose client went away are cancelled: waiting
rows leave the queue, running rows stop at the next decode step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from luspo_megatron.rollout import protocol
from luspo_megatron.rollout.local.faults import FaultInjector
from luspo_megatron.rollout.local.generation import GenResult, GenRow
from luspo_megatron.rollout.local.requests import GenerateRequest

log = logging.getLogger(__name__)


class Scheduler:
    """Waiting queue, batch loop, pause, abort and cancel. :meth:`start` inside the event loop."""

    def __init__(self, run_batch: Callable[[list[GenRow]], list[GenResult]], *, max_running: int = 64,
                 faults: FaultInjector | None = None) -> None:
        assert max_running >= 1
        self.run_batch = run_batch
        self.max_running = max_running
        self.faults = faults or FaultInjector()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="generate")  # all model work, in order
        self.waiting: deque[tuple[GenerateRequest, int]] = deque()
        self.running: list[tuple[GenerateRequest, int]] = []
        self.batches = 0  # generate() calls so far, and the largest batch: batching is observable
        self.max_batch_rows = 0
        self.cancelled_rows = 0  # rows dropped because their client disconnected
        self.isolated_batches = 0  # batches that raised and were re-run request by request
        self.failed_requests = 0  # requests that failed even alone (answered 500)
        self.last_throughput = 0.0

    # --------------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self._work = asyncio.Event()
        self.unpaused = asyncio.Event()
        self.unpaused.set()
        self.model_lock = asyncio.Lock()
        self._loop_task = asyncio.create_task(self._batch_loop())

    async def stop(self) -> None:
        self._loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._loop_task
        self.executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------------------ queue
    def submit(self, request: GenerateRequest) -> None:
        request.attach(asyncio.get_running_loop())
        self.waiting.extend((request, i) for i in range(len(request.rows)))
        self._work.set()

    def running_rows(self) -> int:
        """Rows of the batch on the model that have not finished (stopped, hit their length, aborted)."""
        return sum(1 for req, i in self.running if not req.rows[i].finished)

    def abort(self, rid: str | None, message: str) -> int:
        """Abort waiting and running rows of ``rid`` (every row when None); how many. Linear."""
        def match(req: GenerateRequest, i: int) -> bool:
            return rid is None or rid in (req.rid, req.sample_ids[i])
        return self._drop(match, message, "Abort in waiting queue")

    def cancel(self, request: GenerateRequest) -> int:
        """Stop the rows of a request whose client disconnected; how many were still pending."""
        count = self._drop(lambda req, i: req is request, "client disconnected", "client disconnected")
        self.cancelled_rows += count
        return count

    def _drop(self, match: Callable[[GenerateRequest, int], bool], running_msg: str, waiting_msg: str) -> int:
        count = 0
        keep: deque[tuple[GenerateRequest, int]] = deque()
        for req, i in self.waiting:
            if match(req, i):
                req.rows[i].abort_message = waiting_msg
                req.finish_row(i, GenResult(tokens=[], logp=[], finish=protocol.FINISH_ABORT))
                count += 1
            else:
                keep.append((req, i))
        self.waiting = keep
        for req, i in self.running:
            if match(req, i) and not req.rows[i].finished and not req.rows[i].aborted.is_set():
                req.rows[i].abort_message = running_msg
                req.rows[i].aborted.set()  # the stopper ends the row at the next decode step
                count += 1
        return count

    # ---------------------------------------------------------------------------------- batches
    async def _batch_loop(self) -> None:
        while True:
            await self._work.wait()
            await self.unpaused.wait()
            await self._gather()
            async with self.model_lock:
                if not self.unpaused.is_set():  # paused while we waited for the lock
                    continue
                batch = []
                while self.waiting and len(batch) < self.max_running:
                    batch.append(self.waiting.popleft())
                if not self.waiting:
                    self._work.clear()
                if not batch:
                    continue
                self.running = batch
                self.batches += 1
                self.max_batch_rows = max(self.max_batch_rows, len(batch))
                try:
                    await self._run(batch)
                finally:
                    self.running = []

    async def _run(self, batch: list[tuple[GenerateRequest, int]]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            results = await loop.run_in_executor(self.executor, self._generate, [req.rows[i] for req, i in batch])
        except Exception:
            log.exception("a batch of %d rows failed; re-running it one request at a time", len(batch))
            self.isolated_batches += 1
            await self._run_alone(batch)
            return
        tokens = sum(len(res.tokens) for res in results)
        self.last_throughput = tokens / max(time.perf_counter() - started, 1e-9)
        for (req, i), result in zip(batch, results):
            req.finish_row(i, result)

    async def _run_alone(self, batch: list[tuple[GenerateRequest, int]]) -> None:
        """Each request of a failed batch on its own: the one that fails again fails alone."""
        loop = asyncio.get_running_loop()
        by_request: dict[int, list[tuple[GenerateRequest, int]]] = {}
        for req, i in batch:
            by_request.setdefault(id(req), []).append((req, i))
        for items in by_request.values():
            req = items[0][0]
            try:
                results = await loop.run_in_executor(self.executor, self._generate, [req.rows[i] for _, i in items])
            except Exception as err:  # a bug or OOM in this request's rows: it alone answers 500
                log.exception("request %s failed alone", req.rid)
                self.failed_requests += 1
                req.fail(err)
                continue
            for (_, i), result in zip(items, results):
                req.finish_row(i, result)

    def _generate(self, rows: list[GenRow]) -> list[GenResult]:
        """On the model thread: the injected faults (tests only), then the batch."""
        config = self.faults.config
        if config.stall_s:
            time.sleep(config.stall_s)  # a wedged engine: the model thread makes no progress
        if config.poison_rid and any(r.rid == config.poison_rid for r in rows):
            raise RuntimeError(f"injected fault: poisoned request {config.poison_rid}")
        return self.run_batch(rows)

    async def _gather(self, quiet_s: float = 0.005, max_wait_s: float = 0.05) -> None:
        """Let a burst of requests arrive before a batch starts. A rollout sends one HTTP request
        per sample, over a few milliseconds; starting on the first would run them as a string of
        tiny batches (the batch is static while it generates). Wait until the queue stops growing
        for ``quiet_s``, the batch is full, or ``max_wait_s`` passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_wait_s
        seen = -1
        while seen != len(self.waiting) and len(self.waiting) < self.max_running and loop.time() < deadline:
            seen = len(self.waiting)
            await asyncio.sleep(quiet_s)
