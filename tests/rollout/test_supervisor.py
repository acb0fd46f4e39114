"""LocalEngines' thread budget: a local server must not take more OpenMP threads than the run was
given (oversubscribing a shared 2-core machine made generation ~40x slower, docs/bench/vs_trl.md)."""

from __future__ import annotations

import os

import pytest

from luspo_megatron.rollout.local.supervisor import LocalEngines


@pytest.mark.parametrize(("omp", "expected"), [("3", 3), ("1", 1), ("", None), ("junk", None), ("0", None)])
def test_local_servers_take_omp_num_threads_when_it_is_set(monkeypatch, tmp_path, omp, expected):
    monkeypatch.setenv("OMP_NUM_THREADS", omp)
    engines = LocalEngines(tmp_path, count=1)
    assert engines.threads == (expected or max(1, min(4, os.cpu_count() or 1)))


def test_an_explicit_thread_count_wins_over_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert LocalEngines(tmp_path, count=1, threads=2).threads == 2
