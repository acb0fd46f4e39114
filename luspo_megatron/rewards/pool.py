"""A process pool that scores (response, label, metadata) items with a per-item timeout.

Why processes: math-verify times out with ``signal.alarm``, which only works in a process's main
thread (threads raise ``ValueError``; offline_deps.md §3.3), and a pathological answer can also
pin a CPU in sympy. Each worker therefore runs items in its main thread under its own
``setitimer`` alarm (sub-second resolution): an item that runs past ``timeout_s`` scores 0 and is
counted as a timeout. Two outer guards cover what a signal cannot reach:

* a worker that dies (segfault, ``os._exit``, OOM kill) breaks the ``ProcessPoolExecutor``: the pool
  is replaced and the unfinished items are rescored one at a time, so the item that kills its
  worker is identified; after ``max_attempts`` deaths it scores 0 and is counted as crashed;
* no item finishing for ``timeout_s + grace_s`` means a worker is stuck where SIGALRM cannot
  interrupt (a long C call): the workers are killed and the same rescoring follows.

The scoring function is named by import path (``module:function``), so custom rewards
(``--custom-reward-path``) run here too. It is called as ``fn(response, label, metadata)``.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

Item = tuple[str, Any, Any]  # (response, label, metadata)

OK, TIMEOUT, ERROR = "ok", "timeout", "error"
# Imported once by the fork server (only the first pool of a process sets this).
FORKSERVER_PRELOAD = ("luspo_megatron.rewards.pool", "luspo_megatron.rewards.math")


@dataclass
class ScoreStats:
    """What happened while scoring (accumulated over calls by :class:`RewardPool.stats`)."""

    items: int = 0
    timeouts: int = 0  # items past their timeout: scored 0
    errors: int = 0  # items whose function raised: scored 0
    crashed_items: int = 0  # items that killed their worker max_attempts times: scored 0
    pool_restarts: int = 0  # times the pool was replaced (a dead or stuck worker)
    error_examples: list[str] = field(default_factory=list)

    def add(self, other: ScoreStats) -> None:
        for name in ("items", "timeouts", "errors", "crashed_items", "pool_restarts"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.error_examples = (self.error_examples + other.error_examples)[:5]


def load_function(path: str) -> Callable[..., Any]:
    """``"package.module:function"`` -> the function. Raises ValueError naming what is wrong."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected module:function, got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import module {module_name!r} ({err})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"module {module_name!r} has no function {attr!r}")
    return fn


# -------------------------------------------------------------------------------------- worker side
class _ItemTimeout(BaseException):
    """Raised by the alarm. A BaseException, so libraries' ``except Exception`` cannot swallow it."""


def _on_alarm(signum, frame) -> None:
    raise _ItemTimeout()


_FUNCTIONS: dict[str, Callable[..., Any]] = {}


def _init_worker(preload: tuple[str, ...], ready) -> None:
    # math-verify logs whole inputs on timeouts and warns when its own timeout is off; quiet it.
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for path in preload:  # heavy imports and first-call set-up happen here, not in an item's time
        _FUNCTIONS[path] = load_function(path)
        warm_up = getattr(importlib.import_module(path.partition(":")[0]), "warm_up", None)
        if callable(warm_up):
            warm_up()
    with ready.get_lock():
        ready.value += 1



def _score_item(fn_path: str, item: Item, timeout_s: float) -> tuple[str, float, str]:
    """Runs in a worker's main thread: (status, score, message)."""
    fn = _FUNCTIONS.get(fn_path) or _FUNCTIONS.setdefault(fn_path, load_function(fn_path))
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return OK, float(fn(*item)), ""
    except _ItemTimeout:
        return TIMEOUT, 0.0, ""
    except Exception as err:  # the reward function's bug: score 0, report it
        return ERROR, 0.0, f"{type(err).__name__}: {err}"[:300]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -------------------------------------------------------------------------------------- parent side
class RewardPool:
    """Scores batches of items in worker processes. Reuse one pool for the whole run; ``close()`` it."""

    def __init__(
        self, num_workers: int | None = None, timeout_s: float = 5.0, max_attempts: int = 2, grace_s: float = 5.0,
        preload: tuple[str, ...] = (), startup_timeout_s: float = 300.0,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s: expected > 0, got {timeout_s}")
        self.num_workers = num_workers or min(4, os.cpu_count() or 1)
        self.timeout_s, self.max_attempts, self.grace_s = timeout_s, max_attempts, grace_s
        self.preload, self.startup_timeout_s = tuple(preload), startup_timeout_s
        self.stats = ScoreStats()
        self._pool: ProcessPoolExecutor | None = None
        # forkserver, not fork: the trainer has threads (HTTP client, torch) that a fork would copy
        # mid-state. The fork server is a clean single-threaded process that imports math-verify
        # once, so a replacement worker starts in milliseconds instead of re-importing sympy.
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(list(FORKSERVER_PRELOAD))
        self._ready = self._context.Value("i", 0)  # workers that finished their initializer

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._ready.value = 0
            self._pool = ProcessPoolExecutor(
                self.num_workers, mp_context=self._context, initializer=_init_worker,
                initargs=(self.preload, self._ready),
            )
        return self._pool

    def _starting(self) -> bool:
        """True while some spawned worker has not finished its initializer (imports): a quiet
        pool is then slow to start, not stuck."""
        spawned = len(getattr(self._pool, "_processes", {}) or {})
        return self._ready.value < spawned

    def _replace(self) -> None:
        """Kill every worker and drop the pool; the next call starts a fresh one."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # ProcessPoolExecutor has no public way to kill a worker before Python 3.14
        # (kill_workers); a stuck worker must die, so reach for its process table.
        for process in list(getattr(pool, "_processes", {}).values()):
            process.kill()
        pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        self._replace()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def score(self, fn_path: str, items: Sequence[Item]) -> tuple[list[float], ScoreStats]:
        """Scores in item order, and the stats of this call (also added to ``self.stats``)."""
        stats = ScoreStats(items=len(items))
        scores = [0.0] * len(items)
        pending = list(range(len(items)))
        attempts = [0] * len(items)
        isolate = False  # after a crash: one item in flight at a time, so the culprit is known
        while pending:
            batch = pending[:1] if isolate else pending
            finished, broken = self._run(fn_path, items, batch, scores, stats)
            pending = [i for i in pending if i not in finished]
            if broken:
                stats.pool_restarts += 1
                stats.error_examples = (stats.error_examples + [f"pool restarted: worker {broken}"])[:5]
                self._replace()
                if isolate:  # the one item in flight killed (or hung) its worker
                    culprit = batch[0]
                    attempts[culprit] += 1
                    if broken == "stuck":  # past its timeout where no signal reached it: a timeout
                        stats.timeouts += 1
                        pending.remove(culprit)
                    elif attempts[culprit] >= self.max_attempts:
                        stats.crashed_items += 1
                        pending.remove(culprit)
                isolate = True
        self.stats.add(stats)
        return scores, stats

    def _run(self, fn_path, items, batch, scores, stats) -> tuple[set[int], str | None]:
        """Score ``batch``; returns (finished indices, None | "crash" | "stuck")."""
        pool = self._executor()
        futures: dict[Future, int] = {}
        finished: set[int] = set()
        broken = None
        for i in batch:
            try:
                futures[pool.submit(_score_item, fn_path, items[i], self.timeout_s)] = i
            # A worker died while we were still submitting. The executor notices at its next submit
            # (BrokenProcessPool) or, when that submit is the one that spawns a replacement worker,
            # as an OSError from the executor's already-closed wake-up pipe ("handle is closed").
            except (BrokenProcessPool, OSError):
                broken = "crash"
                break
        waiting = set(futures)
        started = last_progress = time.monotonic()
        while waiting:
            done, waiting = wait(waiting, timeout=0.1, return_when=FIRST_COMPLETED)
            now = time.monotonic()
            if done or (self._starting() and now - started < self.startup_timeout_s):
                last_progress = now  # a result, or workers still importing: not stuck
            elif now - last_progress > self.timeout_s + self.grace_s:
                return finished, "stuck"
            for future in done:
                index = futures[future]
                try:
                    status, value, message = future.result()
                except BrokenProcessPool:
                    broken = "crash"
                    continue
                scores[index] = value
                finished.add(index)
                if status == TIMEOUT:
                    stats.timeouts += 1
                elif status == ERROR:
                    stats.errors += 1
                    stats.error_examples = (stats.error_examples + [message])[:5]
        return finished, broken
