"""trainer/async_rollout.py on its own (fast: no Megatron, no server): the timeline against a fake
engine that records what ran when, the staleness bound, the checkpointed data position, the
window arithmetic, and the config rules of --async-rollout."""

from __future__ import annotations

import dataclasses
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from luspo_megatron.config import load_config
from luspo_megatron.data.dataset import PromptIterator
from luspo_megatron.errors import ConfigError, RolloutError
from luspo_megatron.rollout.engine import Sample
from luspo_megatron.rollout.versions import check_weight_versions, staleness_metrics
from luspo_megatron.trainer.async_rollout import AsyncRollout, _covered, effective_config
from luspo_megatron.trainer.batch import RolloutBatch
from luspo_megatron.trainer.timer import Timer

ROOT = Path(__file__).resolve().parents[2]
P = 3  # prompts per step


class FakeEngine:
    """Generates one sample per prompt tagged with its current weight version; records every event
    and fails the test if weights change while a generation runs, or two generations overlap."""

    def __init__(self, gen_s: float = 0.02) -> None:
        self.version, self.gen_s = "default", gen_s
        self.generating = 0
        self.events: list[tuple[str, int | str]] = []
        self.violations: list[str] = []
        self.lock = threading.Lock()
        self.threads: set[str] = set()

    def collect(self, prompts: PromptIterator, fail_at: int | None = None):
        def collect(step: int, timer: Timer) -> RolloutBatch:
            with self.lock:
                self.generating += 1
                if self.generating > 1:
                    self.violations.append(f"two generations at once (step {step})")
                self.threads.add(threading.current_thread().name)
            try:
                with timer("rollout"):
                    records = prompts.next_batch()
                    self.events.append(("generate", step))
                    version = self.version
                    time.sleep(self.gen_s)
                    if step == fail_at:
                        raise RuntimeError(f"engine died at step {step}")
                samples = [Sample([r], [1], [0.0], "stop", version) for r in records]
                check_weight_versions(samples, step, 1)  # as RolloutStep does, with the async bound
                return RolloutBatch(samples, [0.0] * len(samples), [0.0] * len(samples), [False] * len(samples),
                                    list(records), list(records), {"prompts": records})
            finally:
                with self.lock:
                    self.generating -= 1
        return collect

    def sync(self, version: int) -> None:
        with self.lock:
            if self.generating:
                self.violations.append(f"weights {version} pushed while a generation ran")
        self.events.append(("sync", version))
        self.version = str(version)


def run_loop(steps: int, train_s: float = 0.03, gen_s: float = 0.02, stop_after: int | None = None):
    """The trainer's calls (trainer/loop.py) in order, against the fake engine; returns what it saw."""
    engine = FakeEngine(gen_s)
    prompts = PromptIterator(list(range(100)), P, seed=5)
    seen, saved = {}, {}
    with AsyncRollout(engine.collect(prompts), prompts, last_step=steps) as ar:
        for step in range(1, steps + 1):
            timer = Timer()
            start = time.perf_counter()
            batch, staleness = ar.take(step, timer)
            seen[step] = (batch.metrics["prompts"], staleness, [s.weight_version for s in batch.samples])
            time.sleep(train_s)  # training
            ar.wait_idle()
            engine.sync(step)
            seen[step] += (ar.step_metrics(start, time.perf_counter()), dict(timer.seconds))
            if stop_after is not None and step == stop_after:
                saved = ar.data_state()
                break
            ar.submit(step + 2)
            saved[step] = ar.data_state()
    return engine, prompts, seen, saved


def test_the_timeline_draws_each_step_once_in_order_and_never_syncs_or_overlaps_a_generation():
    engine, prompts, seen, _ = run_loop(6)
    assert engine.violations == []
    # The engine's work in order: G(1) G(2) sync(1) G(3) sync(2) … — the docstring's timeline.
    assert engine.events == [("generate", 1), ("generate", 2), ("sync", 1), ("generate", 3), ("sync", 2),
                             ("generate", 4), ("sync", 3), ("generate", 5), ("sync", 4), ("generate", 6),
                             ("sync", 5), ("sync", 6)]
    assert len(engine.threads) == 1 and threading.current_thread().name not in engine.threads
    # The same prompts per step as a sequential run drawing from the same iterator.
    sequential = PromptIterator(list(range(100)), P, seed=5)
    for step in range(1, 7):
        assert seen[step][0] == sequential.next_batch(), step


def test_every_sample_is_at_most_one_version_behind_and_the_metrics_say_so():
    _, _, seen, _ = run_loop(5)
    for step, (_, staleness, versions, *_rest) in seen.items():
        drawn = 0 if step <= 2 else step - 2  # G(1), G(2) on the initial weights, G(k) on step k−2's
        assert versions == ["default" if drawn == 0 else str(drawn)] * P
        assert staleness == {"weight_staleness_max": float(step - 1 - drawn),
                             "weight_staleness_mean": float(step - 1 - drawn), "weight_version_min": float(drawn)}
        assert staleness["weight_staleness_max"] <= 1


def test_overlap_and_idle_times_account_for_the_steps_window():
    # Generation (0.12 s) longer than training (0.03 s): the trainer waits; the engines idle only around syncs.
    _, _, seen, _ = run_loop(4, train_s=0.03, gen_s=0.12)
    for step in (2, 3):
        timing = seen[step][3]
        assert timing["time_trainer_idle_s"] > 0.05  # waited for G(step+1) before the sync
        assert 0.01 < timing["time_overlap_s"] < 0.12  # ≈ the training time, hidden behind generation
        assert timing["time_engine_idle_s"] < 0.05
    # The step's own generation seconds come from the draw's timer (it ran during the previous step).
    assert all(seen[s][4]["rollout"] >= 0.12 for s in seen)


def test_the_checkpointed_data_position_is_from_before_the_oldest_draw_not_trained_on():
    _, _, seen, saved = run_loop(4)
    for step in (1, 2):  # after step s (G(s+1) drawn, G(s+2) in flight): resume must redraw s+1, s+2
        resumed = PromptIterator(list(range(100)), P, seed=5)
        resumed.load_state_dict(saved[step])
        assert resumed.next_batch() == seen[step + 1][0]
        assert resumed.next_batch() == seen[step + 2][0]
    # A stop right after a sync, before the next submit (SIGTERM): the same rule.
    _, _, _, state = run_loop(5, stop_after=2)
    resumed = PromptIterator(list(range(100)), P, seed=5)
    resumed.load_state_dict(state)
    assert [resumed.next_batch(), resumed.next_batch()] == [seen[3][0], seen[4][0]]


def test_a_generation_that_fails_raises_in_the_trainer_and_close_waits_for_the_one_in_flight():
    engine = FakeEngine(gen_s=0.01)
    prompts = PromptIterator(list(range(100)), P, seed=5)
    ar = AsyncRollout(engine.collect(prompts, fail_at=2), prompts, last_step=5)
    ar.take(1, Timer())
    with pytest.raises(RuntimeError, match="engine died at step 2"):
        ar.wait_idle()
    ar.close()

    slow = FakeEngine(gen_s=0.3)
    prompts = PromptIterator(list(range(100)), P, seed=5)
    ar = AsyncRollout(slow.collect(prompts), prompts, last_step=5)
    ar.take(1, Timer())  # G(2) is submitted: wait until it runs (a draw not started yet is cancelled)
    while not slow.generating:
        time.sleep(0.005)
    start = time.perf_counter()
    ar.close()
    assert time.perf_counter() - start > 0.2 and slow.generating == 0


def _batch(versions: list[str]) -> RolloutBatch:
    samples = [Sample([1], [2], [0.0], "stop", v) for v in versions]
    n = len(samples)
    return RolloutBatch(samples, [0.0] * n, [0.0] * n, [False] * n, [], [])


def test_staleness_metrics_and_the_async_bound_reject_a_sample_beyond_it_or_from_the_future():
    assert staleness_metrics(_batch(["3", "4"]).samples, 5)["weight_staleness_max"] == 1.0
    assert staleness_metrics(_batch(["default"]).samples, 2) == {
        "weight_staleness_max": 1.0, "weight_staleness_mean": 1.0, "weight_version_min": 0.0}
    assert check_weight_versions(_batch(["3", "4"]).samples, 5, 1) == 1  # one stale sample, within the bound
    with pytest.raises(RolloutError, match=r"\['2'\], more than --max-weight-staleness 1"):
        check_weight_versions(_batch(["4", "2"]).samples, 5, 1)
    with pytest.raises(RolloutError, match="newer than the version the trainer pushed"):
        check_weight_versions(_batch(["5"]).samples, 5, 1)  # drawn with weights newer than the trained policy


@pytest.mark.parametrize("spans,start,end", [
    ([(0, 3), (2, 5), (7, 9)], 1, 8),
    ([(4, 6)], 0, 10),
    ([], 0, 3),
    ([(0, 10)], 2, 4),
])
def test_covered_length_equals_a_count_of_unit_cells(spans, start, end):
    cells = sum(1 for t in range(start, end) if any(a <= t < b for a, b in spans))
    assert _covered([(float(a), float(b)) for a, b in spans], float(start), float(end)) == cells


def test_covered_length_on_random_spans_equals_a_count_of_unit_cells():
    rng = random.Random(0)
    for _ in range(200):
        spans = [tuple(sorted(rng.sample(range(30), 2))) for _ in range(rng.randint(0, 5))]
        start, end = sorted(rng.sample(range(30), 2))
        cells = sum(1 for t in range(start, end) if any(a <= t < b for a, b in spans))
        assert _covered([(float(a), float(b)) for a, b in spans], float(start), float(end)) == cells


# ------------------------------------------------------------------------------------------ config
def test_async_rollout_refuses_the_inprocess_engine_in_one_line():
    with pytest.raises(ConfigError, match="--async-rollout: .*inprocess") as err:
        load_config(["--async-rollout", "--rollout-engine", "inprocess", "--weight-sync", "tensor"])
    assert "\n" not in str(err.value)
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "train_luspo.py"), "--async-rollout",
                           "--rollout-engine", "inprocess", "--weight-sync", "tensor"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--async-rollout" in lines[0], proc.stderr


@pytest.mark.parametrize("flags,needle", [
    (["--async-rollout", "--max-weight-staleness", "0"], "--max-weight-staleness"),
    (["--async-rollout", "--async-correction", "recompute", "--use-rollout-logprobs"], "--async-correction"),
    (["--max-weight-staleness", "-1"], "--max-weight-staleness"),
])
def test_async_flags_that_contradict_each_other_are_one_line_errors(flags, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(flags)


def test_bypass_is_exactly_use_rollout_logprobs_and_the_bound_defaults_to_one():
    base, _ = load_config([])
    bypass, _ = load_config(["--async-rollout"])
    recompute, _ = load_config(["--async-rollout", "--async-correction", "recompute", "--use-tis"])
    assert effective_config(base) == base and base.rollout.weight_staleness_bound == 0
    assert effective_config(bypass).rollout.use_rollout_logprobs and bypass.rollout.weight_staleness_bound == 1
    assert effective_config(recompute) == recompute and not recompute.rollout.use_rollout_logprobs
    assert load_config(["--async-rollout", "--max-weight-staleness", "3"])[0].rollout.weight_staleness_bound == 3
    # Nothing else changes.
    effective = effective_config(bypass)
    assert dataclasses.replace(effective, rollout=bypass.rollout) == bypass
    assert dataclasses.replace(effective.rollout, use_rollout_logprobs=False) == bypass.rollout
