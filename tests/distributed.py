"""Launch real multi-process (gloo) workers from tests: torchrun, one process per rank.

Workers are plain scripts; they write their results to ``--out`` (a torch file) and the test
compares. A failing worker fails the test with the tail of its output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def torchrun(script: Path, nproc: int, args: list[str], timeout: float = 300.0) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *args]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-6000:]
        raise AssertionError(f"{script.name} with {nproc} processes failed (exit {proc.returncode}):\n{tail}")
    return proc


def run_worker(script: Path, nproc: int, out: Path, args: list[str] = (), timeout: float = 300.0):
    """Run ``script`` under torchrun with ``--out out`` and return what it saved there."""
    torchrun(script, nproc, ["--out", str(out), *args], timeout=timeout)
    return torch.load(out, weights_only=False)
