"""Fault injection: every sample comes back exactly once, or a RolloutError names the failure."""

from __future__ import annotations

import pytest

from luspo_megatron.errors import RolloutError
from luspo_megatron.rollout.engine import SamplingParams
from luspo_megatron.rollout.local.faults import FaultConfig
from luspo_megatron.rollout.sglang import SGLangEngine
from luspo_megatron.runtime.distributed import free_port
from tests.rollout.conftest import http

PROMPTS = [[5 + i, 6 + i, 7 + i] for i in range(8)]
SAMPLING = SamplingParams(max_new_tokens=8, seed=2024)


def set_faults(server, **faults) -> None:
    status, _ = http("POST", f"{server.url}/luspo/faults", FaultConfig(**faults).to_json())
    assert status == 200


def ids(groups):
    return [[tuple(s.response_ids) for s in g] for g in groups]


@pytest.fixture(scope="module")
def clean_result(server):
    set_faults(server)
    with SGLangEngine([server.url]) as engine:
        return ids(engine.generate(PROMPTS, SAMPLING, n=4))


def test_every_sample_comes_back_exactly_once_through_500s_drops_and_aborts(server, clean_result):
    set_faults(server, error_500_every=3, drop_every=4, abort_every=5)
    try:
        with SGLangEngine([server.url], max_retries=30, backoff_s=0.01, max_backoff_s=0.05) as engine:
            groups = engine.generate(PROMPTS, SAMPLING, n=4)
        calls = http("GET", f"{server.url}/luspo/faults")[1]["generate_calls"]
    finally:
        set_faults(server)
    # Seeded samples are reproducible, so "exactly once, none lost, none duplicated or mixed up"
    # means: the same [P][G] result as the fault-free run.
    assert ids(groups) == clean_result
    assert calls > len(PROMPTS) * 4  # faults really happened and were retried


def test_startup_polls_health_until_the_503s_stop(server):
    set_faults(server, health_503_first=3)
    try:
        with SGLangEngine([server.url], health_poll_s=0.05) as engine:
            health_calls = http("GET", f"{server.url}/luspo/faults")[1]["health_calls"]
            assert engine.health()
    finally:
        set_faults(server)
    assert health_calls == 4  # three 503s, then the 200 that ended the wait


def test_startup_gives_up_with_a_rollout_error_when_never_healthy(server):
    set_faults(server, health_503_first=10**6)
    try:
        with pytest.raises(RolloutError, match=r"/health_generate: not healthy within 1 s \(last: HTTP 503\)"):
            SGLangEngine([server.url], startup_timeout_s=1.0, health_poll_s=0.1)
    finally:
        set_faults(server)


def test_a_server_that_always_fails_raises_naming_server_and_prompt(server):
    set_faults(server, error_500_every=1)
    try:
        with SGLangEngine([server.url], max_retries=2, backoff_s=0.01) as engine:
            with pytest.raises(RolloutError) as err:
                engine.generate([[1, 2]], SAMPLING, n=2)
    finally:
        set_faults(server)
    message = str(err.value)
    assert server.url in message and "prompt 0" in message and "HTTP 500" in message and "3 attempts" in message


def test_a_slow_server_hits_the_request_timeout(server):
    set_faults(server, slow_s=1.0)
    try:
        with SGLangEngine([server.url], request_timeout_s=0.3, max_retries=1, backoff_s=0.01) as engine:
            with pytest.raises(RolloutError, match=r"prompt 0: timed out \(after 2 attempts\)"):
                engine.generate([[1, 2]], SAMPLING, n=1)
    finally:
        set_faults(server)


def test_a_dead_server_is_routed_around_and_nothing_is_lost(server, clean_result):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    with SGLangEngine([dead, server.url], startup_timeout_s=None, max_retries=3, backoff_s=0.01) as engine:
        groups = engine.generate(PROMPTS, SAMPLING, n=4)
    assert ids(groups) == clean_result


def test_persistent_aborts_raise_after_the_retry_bound(server):
    set_faults(server, abort_every=1)
    try:
        with SGLangEngine([server.url], max_retries=1, backoff_s=0.01) as engine:
            with pytest.raises(RolloutError, match=r"prompt 0: aborted \(injected fault: abort\) \(after 2"):
                engine.generate([[1, 2]], SAMPLING, n=1)
    finally:
        set_faults(server)
