"""Our server's liveness, over real HTTP: /health_generate fails when the model thread is wedged and
passes while it makes progress; rows of clients that disconnect are cancelled, waiting or running,
and the requests beside them are served exactly.

One server for the module: fault injection on (tests only), a 1.5 s health timeout, and batches of
at most 2 rows, so that a third request waits in the queue."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from urllib.parse import urlparse

import pytest

from luspo_megatron.rollout.local.faults import FaultConfig
from luspo_megatron.rollout.local.process import LocalServer
from tests.rollout.conftest import http

HEALTH_TIMEOUT_S = 1.5
LONG = {"input_ids": [3, 4, 5], "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}  # ≈ 20 s here
SHORT = {"input_ids": [21, 22, 23], "return_logprob": True,
         "sampling_params": {"max_new_tokens": 8, "temperature": 0.9, "sampling_seed": 77}}


@pytest.fixture(scope="module")
def lively(tiny_moe, tmp_path_factory):
    log = tmp_path_factory.mktemp("lively_log") / "server.log"
    with LocalServer(tiny_moe, log_path=log, max_running_requests=2, enable_fault_injection=True,
                     extra_args=("--health-timeout-s", str(HEALTH_TIMEOUT_S))) as running:
        yield running


def loads(server) -> dict:
    return http("GET", f"{server.url}/v1/loads")[1]["loads"][0]


def cancelled(server) -> int:
    return http("GET", f"{server.url}/server_info")[1]["internal_states"][0]["cancelled_rows"]


def until(predicate, timeout_s: float) -> float:
    """Seconds until ``predicate()`` held; fails after ``timeout_s``."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_s, "timed out"
        time.sleep(0.02)
    return time.monotonic() - started


def open_generate(server, body: dict) -> HTTPConnection:
    """Send a /generate and leave the answer unread (the caller reads it or hangs up)."""
    parts = urlparse(server.url)
    connection = HTTPConnection(parts.hostname, parts.port, timeout=120)
    connection.request("POST", "/generate", body=json.dumps(body), headers={"Content-Type": "application/json"})
    return connection


def hang_up(connection: HTTPConnection) -> None:
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()


def set_faults(server, **faults) -> None:
    assert http("POST", f"{server.url}/luspo/faults", FaultConfig(**faults).to_json())[0] == 200


def test_a_disconnected_client_s_rows_are_cancelled_waiting_or_running_and_others_are_unaffected(lively):
    status, alone = http("POST", f"{lively.url}/generate", SHORT)
    assert status == 200
    before = cancelled(lively)
    with ThreadPoolExecutor(1) as pool:
        running = open_generate(lively, {**LONG, "rid": "long-running"})
        until(lambda: loads(lively)["num_running_reqs"] == 1, 30)
        # The batch is static while it generates: what arrives now waits for the next one.
        waiting = open_generate(lively, {**LONG, "rid": "long-waiting"})
        until(lambda: loads(lively)["num_waiting_reqs"] == 1, 30)
        short = pool.submit(http, "POST", f"{lively.url}/generate", SHORT, 120)
        until(lambda: loads(lively)["num_waiting_reqs"] == 2, 30)

        hang_up(waiting)  # a waiting row leaves the queue; the short request stays in it
        until(lambda: loads(lively)["num_waiting_reqs"] == 1, 5)
        assert cancelled(lively) == before + 1
        assert loads(lively)["num_running_reqs"] == 1  # the long row runs on

        hang_up(running)  # a running row stops at the next decode step, ~20 s before its 2000 tokens
        assert until(lambda: loads(lively)["num_running_reqs"] == 0, 5) < 5
        assert cancelled(lively) == before + 2
        status, out = short.result(timeout=60)  # then the short request runs, as it would have alone
    assert status == 200 and out["output_ids"] == alone["output_ids"]
    assert all(abs(a[0] - b[0]) < 1e-5 for a, b in zip(out["meta_info"]["output_token_logprobs"],
                                                       alone["meta_info"]["output_token_logprobs"]))


def test_health_passes_while_a_long_generation_makes_progress(lively):
    connection = open_generate(lively, LONG)
    try:
        until(lambda: loads(lively)["num_running_reqs"] >= 1, 30)
        started = time.monotonic()
        assert http("GET", f"{lively.url}/health_generate")[0] == 200
        assert time.monotonic() - started < HEALTH_TIMEOUT_S  # answered on progress, not on the timeout
    finally:
        hang_up(connection)
    until(lambda: loads(lively)["num_running_reqs"] == 0, 10)


def test_a_wedged_server_fails_its_health_checks_within_the_timeout(lively):
    set_faults(lively, stall_s=3.0)  # the next batch blocks the model thread for 3 s, twice the timeout
    try:
        started = time.monotonic()
        with ThreadPoolExecutor(2) as pool:  # both paths share sglang's handler: check them together
            statuses = list(pool.map(lambda path: http("GET", f"{lively.url}{path}")[0],
                                     ["/health_generate", "/health"]))
        elapsed = time.monotonic() - started
    finally:
        set_faults(lively)
    assert statuses == [503, 503]
    assert HEALTH_TIMEOUT_S <= elapsed < HEALTH_TIMEOUT_S + 1.5
    # Once the stalled batch is through, the same checks pass again.
    until(lambda: http("GET", f"{lively.url}/health_generate")[0] == 200, 20)
    assert http("GET", f"{lively.url}/health")[0] == 200
