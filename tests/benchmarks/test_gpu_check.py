"""benchmarks/gpu_check.sh, the one script a lent GPU machine runs: it parses, and its dry run on a CPU
prints every GPU step and leaves the CPU-quick table behind (the run that matters needs a GPU)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_gpu_check_script_parses():
    out = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_gpu_check_refuses_an_unknown_argument_with_status_2():
    out = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True)
    assert out.returncode == 2 and "usage" in out.stderr


@pytest.mark.slow
def test_gpu_check_dry_run_lists_every_step_and_writes_the_cpu_table(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=900)
    log = (tmp_path / "gpu_check.log").read_text()
    for step in ("install wheels", "build extension", "CUDA tests", "bench qwen3_30b_a3b", "bench default shape",
                 "tests/ops"):
        assert f"[dry run] {step}" in log, step
    assert "CPU-quick benchmark exit 0" in log, out.stdout[-2000:]
    table = (tmp_path / "train_step_quick_dryrun.md").read_text()
    assert "| sequential | padded | fused |" in table and "| grouped | padded | fused |" in table
