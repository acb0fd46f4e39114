"""Asynchronous rollout (``--async-rollout``, docs/async.md): step n+1's samples are generated and
scored while step n trains, one step off-policy, with bounded weight staleness.

Rank 0 runs :class:`~luspo_megatron.trainer.rollout_step.RolloutStep` (prompts → generate → rewards
→ advantages) on ONE background thread; G(k) below is that call for step k. The other ranks do not
change: they receive the broadcast batch and take part in the collective weight export as before.

    engines   G(1) G(2)══════════════╗      G(3)══════════════╗      G(4)═══ …
    trainer   wait  train(1) ─ wait ─╨ sync(1) train(2) ─ wait ─╨ sync(2) train(3) …
                    (weights 0)             (weights 1)

- At most one generation is in flight, and a weight sync happens only while the engines are idle:
  before ``sync(n)`` the trainer waits for G(n+1) to finish; G(n+2) starts after ``sync(n)`` (and
  after the held-out evaluation of step n, when due). Steady state: a step costs
  max(train, generate) + sync instead of train + generate + sync.
- Hence G(k) runs on the weights of step k−2 (k−1 for the first step of a run): the samples that
  step k trains on lag the policy being trained (version k−1) by at most ONE version. The bound is
  structural; ``collect`` also checks it on every sample (``rollout/versions.py``, with
  ``--max-weight-staleness`` 1 by default here) and :meth:`AsyncRollout.take` logs
  ``weight_staleness_max``.
- The prompt iterator is only touched by the thread, and only while a generation runs; the main
  thread reads it (:meth:`AsyncRollout.submit`) only when nothing is in flight. A checkpoint stores
  the iterator's state from before the oldest draw that has not been trained on
  (:meth:`AsyncRollout.data_state`), so a resumed run regenerates exactly those prompts.
- Thread safety of what the thread calls: the SGLang client runs its own asyncio loop in its own
  thread (``rollout/workers.py``), the reward pool is a process pool, and the evaluator (main
  thread) runs only between a sync and the next submit. The in-process engine is refused by the
  config: it would run the generator in the trainer's interpreter.

Timing per step (rank 0, ``metrics.jsonl``), over the step's wall-clock window W = [start, end]:
``time_rollout_s`` / ``time_reward_s`` (the generation and scoring of this step's batch, which ran
mostly during the previous step), ``time_train_s``, ``time_sync_s``, and

    time_trainer_idle_s   seconds the trainer blocked on the generation thread (waiting for samples,
                          or for the engines to go idle before a sync)
    time_overlap_s        generation seconds inside W that ran while the trainer worked
                          = |∪ generation intervals ∩ W| − time_trainer_idle_s
    time_engine_idle_s    seconds of W with no generation in flight (the engines wait for weights
                          or for the next request) = |W| − |∪ generation intervals ∩ W|
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from luspo_megatron.config import RunConfig
from luspo_megatron.rollout.versions import staleness_metrics
from luspo_megatron.trainer.batch import RolloutBatch
from luspo_megatron.trainer.timer import Timer

logger = logging.getLogger("luspo_megatron.trainer")

# ------------------------------------------------------------------------------------ the config
def effective_config(config: RunConfig) -> RunConfig:
    """The config the trainer runs: ``--async-correction bypass`` (the default with ``--async-rollout``)
    IS ``--use-rollout-logprobs``: π_old := π_rollout, no extra forward pass."""
    r = config.rollout
    if r.async_rollout and r.async_correction == "bypass" and not r.use_rollout_logprobs:
        return dataclasses.replace(config, rollout=dataclasses.replace(r, use_rollout_logprobs=True))
    if r.async_rollout and r.async_correction == "recompute" and not config.algorithm.use_tis:
        logger.warning("--async-correction recompute without --use-tis: the stale samples' ratio is taken against "
                       "π_old with no correction toward the policy that sampled them (docs/async.md)")
    return config


# ------------------------------------------------------------------------------------ the thread
@dataclass
class _Draw:
    """One step's generation on the background thread."""

    step: int
    data_before: Any  # the prompt iterator's state before this draw took its prompts
    timer: Timer = field(default_factory=Timer)
    future: Future | None = None
    started: float | None = None
    ended: float | None = None


class AsyncRollout:
    """Rank 0's generation thread (module docstring). ``collect(step, timer)`` is the
    :class:`~luspo_megatron.trainer.rollout_step.RolloutStep`; ``prompts`` its prompt iterator."""

    def __init__(self, collect: Callable[[int, Timer], RolloutBatch], prompts: Any, *, last_step: int) -> None:
        self.collect, self.prompts, self.last_step = collect, prompts, last_step
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="luspo-async-rollout")
        self._draws: deque[_Draw] = deque()  # submitted, not yet taken by the trainer (oldest first)
        self._intervals: list[tuple[float, float]] = []  # finished generations (perf_counter seconds)
        self._running: _Draw | None = None
        self._lock = threading.Lock()
        self._idle = 0.0  # trainer seconds blocked on the thread, this step

    # ----------------------------------------------------------------------------- generation
    def submit(self, step: int) -> None:
        """Start generating step ``step``'s batch (no-op past the last step or when already drawn)."""
        if step > self.last_step or any(d.step == step for d in self._draws):
            return
        assert not self._in_flight(), "one generation at a time: submit only while the engines are idle"
        assert not self._draws or self._draws[-1].step == step - 1, (
            f"draws must follow the steps: last {self._draws[-1].step}, submitting {step}")
        # Read on the main thread while nothing is in flight: the thread is the iterator's only other user.
        draw = _Draw(step, copy.deepcopy(self.prompts.state_dict()))
        draw.future = self._pool.submit(self._generate, draw)
        self._draws.append(draw)

    def _generate(self, draw: _Draw) -> RolloutBatch:
        with self._lock:
            draw.started, self._running = time.perf_counter(), draw
        try:
            return self.collect(draw.step, draw.timer)
        finally:
            with self._lock:
                draw.ended, self._running = time.perf_counter(), None
                self._intervals.append((draw.started, draw.ended))

    def _in_flight(self) -> bool:
        return any(not d.future.done() for d in self._draws)

    def take(self, step: int, timer: Timer) -> tuple[RolloutBatch, dict[str, float]]:
        """Step ``step``'s batch (waiting for it if needed) and its staleness metrics; step ``step+1``'s
        generation is in flight on return. The draw's own timings (rollout, reward) go into ``timer``."""
        self._idle = 0.0
        if not self._draws:  # the first step of a run: nothing was drawn ahead
            self.submit(step)
        draw = self._draws.popleft()
        assert draw.step == step, f"the trainer is at step {step}, the oldest draw is step {draw.step}"
        batch = self._wait(draw)
        for name, seconds in draw.timer.seconds.items():
            timer.seconds[name] = timer.seconds.get(name, 0.0) + seconds
        self.submit(step + 1)  # the first step of a run: G(step+1) on the same weights
        return batch, staleness_metrics(batch.samples, step)

    def wait_idle(self) -> None:
        """Block until no generation is in flight: the engines may take new weights (before a sync)."""
        for draw in list(self._draws):
            self._wait(draw)

    def _wait(self, draw: _Draw) -> RolloutBatch:
        start = time.perf_counter()
        try:
            return draw.future.result()  # re-raises what the thread raised (a RolloutError, ...)
        finally:
            self._idle += time.perf_counter() - start

    # ------------------------------------------------------------------------------ bookkeeping
    def data_state(self) -> Any:
        """The prompt iterator's state to checkpoint: from before the oldest draw not yet trained on
        (its prompts are drawn again by a resumed run), else the iterator's own."""
        if self._draws:
            return copy.deepcopy(self._draws[0].data_before)
        return self.prompts.state_dict()

    def step_metrics(self, start: float, end: float) -> dict[str, float]:
        """Overlap and idle times over the step's window [start, end] (module docstring)."""
        with self._lock:
            spans = list(self._intervals)
            if self._running is not None and self._running.started is not None:
                spans.append((self._running.started, end))
            self._intervals = [s for s in self._intervals if s[1] > start]  # older ones no longer matter
        busy = _covered(spans, start, end)  # |∪ generation intervals ∩ W|
        return {"time_overlap_s": max(0.0, busy - self._idle), "time_trainer_idle_s": self._idle,
                "time_engine_idle_s": max(0.0, (end - start) - busy)}

    def close(self) -> None:
        """Wait for the generation in flight (it uses the engines, which close after this), then stop."""
        for draw in self._draws:
            draw.future.cancel()  # a draw not started yet needs no waiting for
        self._pool.shutdown(wait=True)
        for draw in self._draws:
            if not draw.future.cancelled() and draw.future.exception() is not None:
                logger.warning("the generation of step %d, never trained on, failed: %s", draw.step,
                               draw.future.exception())
        self._draws.clear()

    def __enter__(self) -> AsyncRollout:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _covered(spans: list[tuple[float, float]], start: float, end: float) -> float:
    """Length of (∪ spans) ∩ [start, end]."""
    clipped = sorted((max(a, start), min(b, end)) for a, b in spans if b > start and a < end)
    total, reach = 0.0, start
    for a, b in clipped:
        a = max(a, reach)
        if b > a:
            total, reach = total + (b - a), b
    return total
