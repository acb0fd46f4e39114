"""The client behind the real sglang-router 0.3.2 (requirements/test.txt), over real HTTP: the worker
registry, URL normalisation, generation through the router and control calls to the workers.

tests/rollout/fake_router.py stays for what 0.3.2 cannot do: the 0.2.x API (/add_worker,
/list_workers), which 0.3.2 answers with 404.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from luspo_megatron.errors import RolloutError
from luspo_megatron.rollout.engine import SamplingParams
from luspo_megatron.rollout.router import list_workers, normalize_url, register_worker, unregister_worker
from luspo_megatron.rollout.sglang import SGLangEngine
from tests.rollout.fake_router import LegacyRouter, OldSGLang

SAMPLING = SamplingParams(max_new_tokens=6, seed=7)
PROMPTS = [[5, 6], [7, 8, 9], [10]]


@pytest.mark.parametrize(("given", "normal"), [
    ("http://127.0.0.1:30000/", "http://127.0.0.1:30000"),
    ("127.0.0.1:30000", "http://127.0.0.1:30000"),
    ("HTTP://Worker-1.Example:8000//", "http://worker-1.example:8000"),
    ("https://host/sglang/", "https://host/sglang"),
    ("http://[::1]:8000/", "http://[::1]:8000"),
    (" http://10.0.0.5:30001 ", "http://10.0.0.5:30001"),
])
def test_urls_are_normalised_to_scheme_host_port_without_trailing_slash(given, normal):
    assert normalize_url(given) == normal
    assert normalize_url(normal) == normal


@pytest.mark.parametrize("bad", ["ftp://host:1", "http://", "http://host:99999"])
def test_a_malformed_url_is_a_rollout_error_naming_it(bad):
    with pytest.raises(RolloutError, match="server URL"):
        normalize_url(bad)


def test_a_trailing_slash_registers_a_healthy_worker_and_remove_waits_until_it_is_gone(server, sglang_router):
    # 0.3.2 keeps the URL as given and checks url + "/health": with the slash it was never listed.
    router = sglang_router()
    register_worker(router.url, server.url + "/")  # waits past the 202 until the router lists it
    assert router.workers() == [server.url]
    assert [w["url"] for w in list_workers(router.url)] == [server.url] and list_workers(router.url)[0]["id"]
    unregister_worker(router.url, server.url + "/")  # 0.3.2 answers 202 and removes it later: we wait
    assert router.workers() == []


def test_from_router_generates_through_the_router_and_controls_the_workers(server, sglang_router):
    with SGLangEngine([server.url]) as direct:
        expected = direct.generate(PROMPTS, SAMPLING, n=2)
    router = sglang_router([server.url], extra_args=("--log-level", "info"))
    with SGLangEngine.from_router(router.url + "/") as engine:
        assert engine.worker_urls == [server.url] and engine.pool.router_url == router.url
        groups = engine.generate(PROMPTS, SAMPLING, n=2)
        engine.pause()
        engine.flush_cache()
        engine.resume()
        assert engine.weight_version() == "default"
    assert [[s.response_ids for s in g] for g in groups] == [[s.response_ids for s in g] for g in expected]
    log = router.log()
    assert log.count("uri=/generate") >= len(PROMPTS) * 2  # seeded: one request per sample, through the router
    assert "pause_generation" not in log and "flush_cache" not in log and "model_info" not in log  # to the worker


def test_router_0_2_form_is_used_when_workers_api_is_missing(server):
    with LegacyRouter() as router:  # 0.3.2 has no 0.2.x routes: the stand-in plays the old router
        register_worker(router.url, server.url)
        assert router.calls["POST /workers"] == 1 and router.calls["POST /add_worker"] == 1  # tried 0.3 first
        with SGLangEngine.from_router(router.url) as engine:
            assert len(engine.generate(PROMPTS, SAMPLING, n=2)[2]) == 2
        unregister_worker(router.url, server.url)
        assert list_workers(router.url) == [] and router.calls["POST /remove_worker"] == 1


def test_a_router_without_workers_is_a_rollout_error(sglang_router):
    router = sglang_router()
    with pytest.raises(RolloutError, match=rf"router {router.url}: lists no workers \(waited 1 s\)"):
        SGLangEngine.from_router(router.url, startup_timeout_s=1.0, health_poll_s=0.1)


def test_the_engine_waits_for_a_router_that_is_still_starting(server, sglang_router):
    # The trainer may start beside its router and servers: nothing listens yet, then no worker is listed.
    router = sglang_router([server.url], launch=False)
    with ThreadPoolExecutor(1) as pool:
        engine = pool.submit(SGLangEngine.from_router, router.url, health_poll_s=0.1)
        time.sleep(1.0)
        assert not engine.done()  # connection refused: still waiting, within its start-up timeout
        router.start(wait=False)
        with engine.result(timeout=60) as client:
            assert client.worker_urls == [server.url]


def test_model_info_falls_back_to_get_model_info_on_older_sglang(server):
    with OldSGLang(server.url) as old, SGLangEngine([old.url]) as engine:
        assert engine.model_info["model_type"] == "qwen3_moe"
        assert engine.weight_version() == "default"
        assert old.calls["/model_info"] >= 1 and old.calls["/get_model_info"] >= 1


def test_an_unreachable_router_is_one_rollout_error_within_the_startup_timeout():
    from luspo_megatron.runtime.distributed import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(RolloutError) as err:
        SGLangEngine.from_router(url, startup_timeout_s=2.0)
    took = time.monotonic() - start
    assert url in str(err.value) and "\n" not in str(err.value)
    assert 1.5 <= took < 30, f"gave up after {took:.1f} s, not after the 2 s start-up timeout"
