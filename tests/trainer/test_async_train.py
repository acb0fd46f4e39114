"""``--async-rollout`` end to end (tools/train_luspo.py, real Megatron policy, real rollout server
over HTTP, real reward pool, real checkpoints): trainer/async_rollout.py inside the loop.

The oracles:
- at lr 1e-50 the weights never change (every Adam update underflows float32), so staleness cannot
  matter: the async run must draw, score and train exactly what the sequential run does, step for
  step. The sequential run takes ``--use-rollout-logprobs``, which is what ``--async-correction
  bypass`` means, so even the losses agree bit for bit;
- at lr 1e-3 the weights move: every sample's version is checked against the bound, a SIGTERM'd run
  is resumed and compared with the uninterrupted one (same prompts; same samples where both drew
  with the same weights), and the resumed run, with ``--async-correction recompute``, has ratio 1
  exactly (π_old is recomputed), so its loss is the on-policy closed form of test_train_luspo.py.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.trainer.test_train_luspo import ROOT, TINY, G, P, _env, _processes_mentioning, expected_loss, rows, train

TINY_LR = ["--lr", "1e-50", "--lr-warmup-iters", "0"]  # > 0 as --lr demands; every update underflows to 0
# Long enough that about a third of the responses stop before the limit: the lengths differ, so the
# LUSPO loss −(1/B) Σ_i |y_i| s_i Â_i is far from 0 and comparing it means something.
LR0 = [*TINY_LR, "--rollout-max-response-len", "48"]
STEPS = 4
LR_STEPS = 5


def by_step(log_dir: Path, name: str = "samples.jsonl") -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for row in rows(log_dir, name):
        out.setdefault(row["step"], []).append(row)
    return {k: sorted(v, key=lambda r: r["index"]) for k, v in out.items()}


def drawn(samples: list[dict]) -> list[tuple]:
    """What a step drew and scored, sample by sample."""
    return [(s["prompt"], s["response"], s["response_len"], s["finish"], s["reward"], s["advantage"])
            for s in samples]


def check_versions(metrics: list[dict], first_step: int = 1) -> None:
    """G(k) runs on the weights of step k−2 (k−1 for a run's first step, whose weights it started from)."""
    for row in metrics:
        step = row["step"]
        version = first_step - 1 if step == first_step else step - 2
        assert row["weight_version_min"] == version, row
        assert row["weight_staleness_max"] == row["weight_staleness_mean"] == step - 1 - version <= 1, row


@pytest.fixture(scope="module")
def lr0_runs(tmp_path_factory):
    """The same 4 steps at lr 1e-50, sequential (--use-rollout-logprobs) and --async-rollout."""
    base = tmp_path_factory.mktemp("async_lr0")
    train(base / "sync", "--train-iters", str(STEPS), "--loss", "luspo", "--use-rollout-logprobs", *LR0)
    train(base / "async", "--train-iters", str(STEPS), "--loss", "luspo", "--async-rollout", *LR0)
    return base / "sync", base / "async"


def test_async_run_at_lr_zero_draws_scores_and_trains_exactly_as_the_sequential_run(lr0_runs):
    sync_dir, async_dir = lr0_runs
    sync_samples, async_samples = by_step(sync_dir), by_step(async_dir)
    assert sorted(sync_samples) == sorted(async_samples) == list(range(1, STEPS + 1))
    for step in sync_samples:
        assert len(async_samples[step]) == P * G
        assert drawn(async_samples[step]) == drawn(sync_samples[step]), step
    sync_metrics, async_metrics = rows(sync_dir), rows(async_dir)
    for a, b in zip(sync_metrics, async_metrics, strict=True):
        for key in ("reward_mean", "advantage_std", "response_len_mean", "clip_frac"):
            assert b[key] == a[key], (a["step"], key, a[key], b[key])
        # The same tokens through the same trainer. Bit for bit when the server batched the 16
        # requests the same way; a batch split differently (the sends race the trainer for the GIL)
        # may move the engine's float32 log-probs, hence the anchor, in the last bits.
        for key in ("loss", "grad_norm", "entropy"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["step"], key, a[key], b[key])
        assert b["mean_abs_log_ratio"] == pytest.approx(a["mean_abs_log_ratio"], abs=1e-6)
    # Not vacuous: the advantages are not all 0 and the lengths differ, so each step's loss and
    # gradient are real ones.
    assert all(r["grad_norm"] > 0 and r["advantage_std"] > 0 for r in async_metrics)
    assert max(abs(r["loss"]) for r in async_metrics) > 1e-3


def test_async_run_logs_staleness_within_the_bound_and_the_overlap_and_idle_times(lr0_runs):
    sync_dir, async_dir = lr0_runs
    metrics = rows(async_dir)
    check_versions(metrics)
    assert "weight_staleness_max" not in rows(sync_dir)[0]
    for row in metrics:
        for key in ("time_rollout_s", "time_train_s", "time_sync_s", "time_overlap_s", "time_trainer_idle_s",
                    "time_engine_idle_s"):
            assert row[key] >= 0, (row["step"], key)
        assert row["time_overlap_s"] + row["time_trainer_idle_s"] <= row["time_step_s"] + 1e-6
        assert row["time_engine_idle_s"] <= row["time_step_s"] + 1e-6
    # G(step+1) runs while step trains (steps 2 … N−1 have a next draw in flight from their start).
    assert all(r["time_overlap_s"] > 0 for r in metrics[1:-1])
    assert metrics[-1]["time_overlap_s"] == 0.0  # no step N+1 to draw


@pytest.fixture(scope="module")
def lr_runs(tmp_path_factory):
    """At lr 1e-3: an uninterrupted async run (C); the same run stopped by SIGTERM after its first
    logged step (E, checkpoint at step k); E resumed with --async-correction recompute (D)."""
    base = tmp_path_factory.mktemp("async_lr")
    full, stopped, resumed = base / "full", base / "stopped", base / "resumed"
    train(full, "--train-iters", str(LR_STEPS), "--loss", "luspo", "--async-rollout")

    cmd = [sys.executable, str(ROOT / "tools" / "train_luspo.py"), *TINY, "--log-dir", str(stopped),
           "--train-iters", str(LR_STEPS), "--loss", "luspo", "--async-rollout", "--save", str(stopped / "ckpt"),
           "--save-interval", "1000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not ((stopped / "metrics.jsonl").exists() and rows(stopped)) and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)  # step 2's generation (G(3)) is in flight by now
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    k = len(rows(stopped))
    if k < LR_STEPS:
        train(resumed, "--train-iters", str(min(k + 2, LR_STEPS)), "--loss", "luspo", "--async-rollout",
              "--async-correction", "recompute", "--load", str(stopped / "ckpt"))
    return full, stopped, resumed, proc.returncode, stderr


def test_every_sample_of_a_learning_async_run_is_within_the_staleness_bound(lr_runs):
    full = lr_runs[0]
    metrics = rows(full)
    check_versions(metrics)
    # The bypass anchor is the policy that sampled: from step 2 on it is one version behind, and the
    # sequence ratio π_θ/π_rollout moves away from 1 (step 1: the same weights, only numerical noise).
    first, later = metrics[0]["mean_abs_log_ratio"], [r["mean_abs_log_ratio"] for r in metrics[1:]]
    assert all(v > 10 * first + 1e-6 for v in later), (first, later)


def test_sigterm_mid_generation_waits_saves_and_exits_cleanly(lr_runs):
    full, stopped, _, returncode, stderr = lr_runs
    assert returncode == 0, stderr[-3000:]
    assert "signal SIGTERM" in stderr
    logged = rows(stopped)
    assert 1 <= len(logged) < LR_STEPS, "the run ended before the signal: nothing was interrupted"
    assert (stopped / "ckpt" / "latest").read_text().strip() == str(logged[-1]["step"])
    # Up to the stop, the same run as the uninterrupted one.
    full_samples, stopped_samples = by_step(full), by_step(stopped)
    for step in range(1, len(logged) + 1):
        assert drawn(stopped_samples[step]) == drawn(full_samples[step])
    time.sleep(1.0)
    assert not _processes_mentioning(str(stopped)), "the rollout server outlived the trainer"


def test_resume_regenerates_the_in_flight_prompts_and_recompute_anchors_at_pi_old(lr_runs):
    full, stopped, resumed, _, _ = lr_runs
    k = len(rows(stopped))
    full_samples, resumed_samples = by_step(full), by_step(resumed)
    assert sorted(resumed_samples) == list(range(k + 1, min(k + 2, LR_STEPS) + 1))
    # Step k+1 was in flight at the checkpoint: the same prompts, drawn again (with weights k, where the
    # uninterrupted run had k−1, so the responses may differ).
    assert [s["prompt"] for s in resumed_samples[k + 1]] == [s["prompt"] for s in full_samples[k + 1]]
    if k + 2 <= LR_STEPS:  # G(k+2) ran on weights k in both runs: the very same samples and rewards
        assert drawn(resumed_samples[k + 2]) == drawn(full_samples[k + 2])
    metrics = rows(resumed)
    check_versions(metrics, first_step=k + 1)
    for row in metrics:  # recompute, one optimizer step: π_old = sg[π_θ], ratio 1, the closed form
        assert row["mean_abs_log_ratio"] == 0.0 and row["clip_frac"] == 0.0
        assert row["loss"] == pytest.approx(expected_loss(resumed_samples[row["step"]], "luspo"), rel=1e-5, abs=1e-6)


@pytest.mark.slow  # ≈ 20 s more than the lr-0 pair it compares with: two servers start
def test_async_run_against_two_local_servers_draws_what_the_sequential_run_draws(lr0_runs, tmp_path):
    # Each request carries its own seed, so which of the two servers answers does not matter.
    train(tmp_path, "--train-iters", "3", "--loss", "luspo", "--async-rollout", "--rollout-num-engines", "2", *LR0)
    check_versions(rows(tmp_path))
    sync_samples, two = by_step(lr0_runs[0]), by_step(tmp_path)
    for step in (1, 2, 3):
        assert drawn(two[step]) == drawn(sync_samples[step]), step
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["rollout"]["num_engines"] == 2
