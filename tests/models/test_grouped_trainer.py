"""tools/train_luspo.py with --moe-grouped-gemm trains exactly as without it: two RL steps of the tiny
Qwen3-MoE (in-process rollout engine, tensor weight sync, no SFT warm-up), the two runs side by side.
The sequential run is the oracle; the grouped run goes through torch grouped_mm (float32 on a CPU).
Most responses reach the length cap, so the on-policy LUSPO term is ≈ 0; the entropy bonus makes the
logged loss depend on the model's logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLAGS = [
    "--train-iters", "2", "--rollout-batch-size", "4", "--n-samples-per-prompt", "4",
    "--rollout-max-response-len", "12", "--sft-warmup-steps", "0", "--synthetic-num-prompts", "64", "--seed", "7",
    "--no-progress", "--lr", "1e-3", "--custom-reward-path", "tests.trainer.rewards:digit_fraction",
    "--reward-num-workers", "1", "--moe-aux-loss-coeff", "0", "--loss", "luspo", "--entropy-coef", "0.01",
    "--rollout-engine", "inprocess", "--weight-sync", "tensor",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    procs = {}
    for name, extra in (("sequential", []), ("grouped", ["--moe-grouped-gemm"])):
        log_dir = tmp_path_factory.mktemp(name)
        cmd = [sys.executable, str(ROOT / "tools" / "train_luspo.py"), *FLAGS, "--log-dir", str(log_dir), *extra]
        procs[name] = (log_dir, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                                 stderr=subprocess.PIPE, text=True))
    out = {}
    for name, (log_dir, proc) in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-4000:]
        rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
        out[name] = (rows, stderr)
    return out


def test_grouped_gemm_run_equals_the_sequential_run(runs):
    (seq, seq_log), (grp, grp_log) = runs["sequential"], runs["grouped"]
    assert "experts grouped (torch grouped_mm)" in grp_log  # the flag reached the model
    assert "experts sequential (SequentialMLP)" in seq_log
    assert [r["step"] for r in seq] == [r["step"] for r in grp] == [1, 2]
    for a, b in zip(seq, grp):
        assert abs(a["loss"]) > 1e-3  # not a vacuous comparison
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["reward_mean"] == a["reward_mean"] and b["response_len_mean"] == a["response_len_mean"]
