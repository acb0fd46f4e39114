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


def _engines(tiny_moe, tmp_path, monkeypatch):
    import shutil

    from luspo_megatron.rollout.local.auth import API_KEY_ENV

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    allowed = tmp_path / "rollout_weights"
    shutil.copytree(tiny_moe, allowed)
    return LocalEngines(tiny_moe, count=1, allowed_weight_dirs=[allowed], poll_s=0.05), allowed


def _check_guarded(engines, tiny_moe, allowed) -> None:
    from tests.rollout.conftest import http

    url = engines.urls[0]
    assert http("GET", f"{url}/model_info")[0] == 401
    assert http("GET", f"{url}/model_info", api_key=engines.api_key)[0] == 200
    status, out = http("POST", f"{url}/update_weights_from_disk", {"model_path": str(tiny_moe)},
                       api_key=engines.api_key)
    assert status == 400 and "--allowed-weight-dirs" in out["message"]
    status, out = http("POST", f"{url}/update_weights_from_disk", {"model_path": str(allowed)},
                       api_key=engines.api_key)
    assert status == 200, out


def test_local_servers_require_the_run_s_random_key_and_read_weights_only_where_allowed(tiny_moe, tmp_path,
                                                                                        monkeypatch):
    """The trainer's hook (docs/reliability.md §1): its servers get a key of their own, passed to
    them through the environment (not their command line, which every user of the machine can read),
    and load weights only from the directories the trainer writes."""
    import psutil

    engines, allowed = _engines(tiny_moe, tmp_path, monkeypatch)
    with engines:
        assert engines.api_key and engines.api_key != LocalEngines(tmp_path, count=1).api_key  # random per run
        assert engines.api_key not in " ".join(psutil.Process(engines.servers[0].proc.pid).cmdline())
        _check_guarded(engines, tiny_moe, allowed)


@pytest.mark.slow  # two server start-ups (≈ 20 s on a loaded 2-core machine)
def test_a_restarted_local_server_keeps_the_key_and_the_allowed_directories(tiny_moe, tmp_path, monkeypatch):
    import time

    engines, allowed = _engines(tiny_moe, tmp_path, monkeypatch)
    with engines:
        engines.servers[0].proc.kill()  # the watchdog restarts it
        deadline = time.monotonic() + 120
        while engines.restarts == 0:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        _check_guarded(engines, tiny_moe, allowed)
