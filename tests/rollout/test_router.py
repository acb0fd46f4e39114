"""The client behind an sglang-router (0.3.x /workers API and the 0.2.x fallback), over real HTTP."""

from __future__ import annotations

import pytest

from luspo_megatron.errors import RolloutError
from luspo_megatron.rollout.engine import SamplingParams
from luspo_megatron.rollout.router import list_workers, register_worker, unregister_worker
from luspo_megatron.rollout.sglang import SGLangEngine
from tests.rollout.fake_router import FakeRouter, OldSGLang

SAMPLING = SamplingParams(max_new_tokens=6, seed=7)
PROMPTS = [[5, 6], [7, 8, 9], [10]]


def test_router_0_3_registers_lists_and_removes_workers_by_id(server):
    with FakeRouter() as router:
        register_worker(router.url, server.url)  # waits past the 202 until the worker is listed
        assert [w["url"] for w in list_workers(router.url)] == [server.url]
        assert router.calls["POST /workers"] == 1 and router.calls["POST /add_worker"] == 0
        worker_id = list_workers(router.url)[0]["id"]
        unregister_worker(router.url, server.url)
        assert list_workers(router.url) == []
        assert router.calls[f"DELETE /workers/{worker_id}"] == 1


def test_from_router_generates_through_the_router_and_controls_the_workers(server):
    with SGLangEngine([server.url]) as direct:
        expected = direct.generate(PROMPTS, SAMPLING, n=2)
    with FakeRouter() as router:
        register_worker(router.url, server.url)
        with SGLangEngine.from_router(router.url) as engine:
            assert engine.worker_urls == [server.url]
            groups = engine.generate(PROMPTS, SAMPLING, n=2)
            engine.pause()
            engine.flush_cache()
            engine.resume()
            assert engine.weight_version() == "default"
    assert [[s.response_ids for s in g] for g in groups] == [[s.response_ids for s in g] for g in expected]
    assert router.calls["POST /generate"] == len(PROMPTS) * 2  # seeded: one request per sample
    assert not any("pause" in k or "flush" in k or "model_info" in k for k in router.calls)  # control: workers


def test_router_0_2_form_is_used_when_workers_api_is_missing(server):
    with FakeRouter(legacy=True) as router:
        register_worker(router.url, server.url)
        assert router.calls["POST /workers"] == 1 and router.calls["POST /add_worker"] == 1  # tried 0.3 first
        with SGLangEngine.from_router(router.url) as engine:
            assert len(engine.generate(PROMPTS, SAMPLING, n=2)[2]) == 2
        unregister_worker(router.url, server.url)
        assert list_workers(router.url) == [] and router.calls["POST /remove_worker"] == 1


def test_a_router_without_workers_is_a_rollout_error():
    with FakeRouter() as router, pytest.raises(RolloutError, match="lists no workers"):
        SGLangEngine.from_router(router.url)


def test_model_info_falls_back_to_get_model_info_on_older_sglang(server):
    with OldSGLang(server.url) as old, SGLangEngine([old.url]) as engine:
        assert engine.model_info["model_type"] == "qwen3_moe"
        assert engine.weight_version() == "default"
        assert old.calls["/model_info"] >= 1 and old.calls["/get_model_info"] >= 1
