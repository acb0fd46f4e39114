"""Our server in a real subprocess, over real HTTP: SGLang's /generate schema, and the client on it."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from luspo_megatron.errors import RolloutError
from luspo_megatron.rollout.engine import SamplingParams
from luspo_megatron.rollout.protocol import KNOWN_SAMPLING_KEYS
from luspo_megatron.rollout.sglang import SGLangEngine
from tests.rollout.conftest import EOS, forward_logp, greedy, http


@pytest.fixture(scope="module")
def engine(server):
    with SGLangEngine([server.url], max_concurrency=32) as client:
        yield client


def test_generate_answers_with_sglang_0_5_23_schema(server):
    body = {"input_ids": [5, 6, 7], "return_logprob": True,
            "sampling_params": {"max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0, "top_k": -1,
                                "no_stop_trim": True, "skip_special_tokens": False, "stop": None,
                                "stop_token_ids": None, "spaces_between_special_tokens": False}}
    status, out = http("POST", f"{server.url}/generate", body)
    assert status == 200 and set(out) >= {"text", "output_ids", "meta_info"}
    meta = out["meta_info"]
    assert set(meta) >= {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens",
                         "weight_version", "e2e_latency", "output_token_logprobs"}
    assert meta["prompt_tokens"] == 3 and meta["completion_tokens"] == len(out["output_ids"])
    assert meta["weight_version"] == "default"
    reason = meta["finish_reason"]
    assert reason in ({"type": "length", "length": 6}, {"type": "stop", "matched": EOS})
    for (logp, token, text), output_id in zip(meta["output_token_logprobs"], out["output_ids"]):
        assert token == output_id and text is None and logp <= 0
    status, listed = http("POST", f"{server.url}/generate", {**body, "sampling_params": {"n": 3, "max_new_tokens": 2}})
    assert status == 200 and isinstance(listed, list) and len(listed) == 3


def test_unknown_sampling_key_is_http_400_like_sglang_0_5_23(server):
    status, out = http("POST", f"{server.url}/generate", {"input_ids": [1, 2], "sampling_params": {"foo": 1}})
    assert status == 400 and "unknown field `foo`" in out["error"]
    status, out = http("POST", f"{server.url}/generate", {"input_ids": [1, 2], "sampling_params": {"top_p": 0}})
    assert status == 400 and out["code"] == 400 and "top_p" in out["message"]
    status, out = http("POST", f"{server.url}/generate", {"text": "hello"})
    assert status == 400 and "input_ids" in out["message"]


def test_client_sends_only_known_sampling_keys(engine, server):
    # The server rejects unknown keys with 400, so a successful seeded and unseeded call proves it;
    # the key set itself is checked against sglang 0.5.23's list too.
    from luspo_megatron.rollout.protocol import sampling_params_json

    params = sampling_params_json(SamplingParams(stop_token_ids=(3,), seed=1), 2, 5)
    assert set(params) <= KNOWN_SAMPLING_KEYS
    engine.generate([[1, 2]], SamplingParams(max_new_tokens=2, stop_token_ids=(3,), seed=1), n=2)


def test_client_returns_n_samples_per_prompt_with_forward_pass_logprobs(engine, tiny_moe):
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14]]
    sampling = SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=12)
    groups = engine.generate(prompts, sampling, n=4)
    assert [len(g) for g in groups] == [4, 4, 4, 4]
    for prompt, group in zip(prompts, groups):
        assert len({tuple(s.response_ids) for s in group}) > 1, "the G samples of a prompt should differ"
        for sample in group:
            assert sample.prompt_ids == prompt and sample.weight_version == "default"
            assert sample.finish in ("stop", "length")
            reference = forward_logp(tiny_moe, prompt, sample.response_ids, sampling.temperature)
            assert max(abs(a - b) for a, b in zip(sample.rollout_logp, reference)) < 1e-5


def test_finish_reasons_stop_with_the_stop_token_kept_and_length(engine, tiny_moe):
    prompt = [20, 21, 22]
    path = greedy(tiny_moe, prompt, 8)
    stop = next(t for i, t in enumerate(path) if i >= 2 and t not in path[:i] and t != EOS)
    cut = path.index(stop) + 1
    [[stopped]] = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=(stop,)), 1)
    assert stopped.finish == "stop" and stopped.response_ids == path[:cut]  # no_stop_trim: stop token kept
    assert stopped.meta["finish_reason"] == {"type": "stop", "matched": stop}
    [[short]] = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=2), 1)
    assert short.finish == "length" and short.response_ids == path[:2]


def test_without_no_stop_trim_the_server_drops_the_matched_stop_token(server, tiny_moe):
    prompt = [20, 21, 22]
    path = greedy(tiny_moe, prompt, 8)
    stop = next(t for i, t in enumerate(path) if i >= 2 and t not in path[:i] and t != EOS)
    cut = path.index(stop)
    body = {"input_ids": prompt, "return_logprob": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": 8, "stop_token_ids": [stop]}}
    status, out = http("POST", f"{server.url}/generate", body)
    assert status == 200 and out["output_ids"] == path[:cut]  # sglang's default no_stop_trim=false
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert len(out["meta_info"]["output_token_logprobs"]) == cut


def test_seeded_generate_is_reproducible_and_seeds_differ_per_sample(engine):
    prompts = [[30, 31], [32, 33, 34]]
    a = engine.generate(prompts, SamplingParams(max_new_tokens=10, seed=123), n=3)
    b = engine.generate(prompts, SamplingParams(max_new_tokens=10, seed=123), n=3)
    c = engine.generate(prompts, SamplingParams(max_new_tokens=10, seed=124), n=3)
    ids = lambda groups: [[s.response_ids for s in g] for g in groups]
    assert ids(a) == ids(b) != ids(c)
    assert len({tuple(s) for s in ids(a)[0]}) == 3


def test_concurrent_requests_share_batches(engine, server):
    before = http("GET", f"{server.url}/server_info")[1]["internal_states"][0]
    prompts = [[40 + i, 41 + i] for i in range(32)]
    groups = engine.generate(prompts, SamplingParams(max_new_tokens=16), n=2)
    after = http("GET", f"{server.url}/server_info")[1]["internal_states"][0]
    assert sum(len(g) for g in groups) == 64
    # The 32 concurrent requests (64 rows) arrive as one burst and are gathered into few batches.
    assert after["batches"] - before["batches"] <= 4
    assert after["max_batch_rows"] >= 32


def test_abort_request_returns_the_partial_output_with_an_abort_reason(server):
    rid = "abort-me"
    body = {"input_ids": [3, 4, 5], "rid": rid, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(http, "POST", f"{server.url}/generate", body, 60)
        deadline = time.monotonic() + 20
        while http("GET", f"{server.url}/v1/loads")[1]["loads"][0]["num_running_reqs"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.2)
        assert http("POST", f"{server.url}/abort_request", {"rid": rid})[0] == 200
        status, out = pending.result()
    assert status == 200
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert 0 < out["meta_info"]["completion_tokens"] < 2000
    assert len(out["meta_info"]["output_token_logprobs"]) == len(out["output_ids"])


def test_pause_holds_new_requests_and_continue_releases_them(engine, server):
    engine.pause()
    engine.flush_cache()  # nothing running while paused: flush succeeds
    done = threading.Event()
    result = {}

    def run() -> None:
        result["groups"] = engine.generate([[7, 8]], SamplingParams(max_new_tokens=4), n=2)
        done.set()

    thread = threading.Thread(target=run)
    thread.start()
    assert not done.wait(1.0), "a request finished while the server was paused"
    engine.resume()
    assert done.wait(30)
    thread.join()
    assert len(result["groups"][0]) == 2


def test_health_model_info_and_weight_version(engine, server):
    assert engine.health()
    assert engine.weight_version() == "default"
    assert engine.model_info["model_type"] == "qwen3_moe"
    assert http("GET", f"{server.url}/health_generate")[0] == 200


def test_a_4xx_answer_is_raised_at_once_with_the_server_and_prompt(engine):
    with pytest.raises(RolloutError, match=r"/generate rejected prompt 1: HTTP 400"):
        engine.generate([[1, 2], [10**6]], SamplingParams(max_new_tokens=2), n=1)  # token id out of vocab


def test_flush_cache_is_retried_while_the_server_answers_400(server):
    body = {"input_ids": [3, 4], "sampling_params": {"max_new_tokens": 150, "ignore_eos": True}}
    with ThreadPoolExecutor(1) as pool, SGLangEngine([server.url], flush_retries=1000, flush_retry_s=0.02) as engine:
        pending = pool.submit(http, "POST", f"{server.url}/generate", body, 60)
        deadline = time.monotonic() + 20
        while http("GET", f"{server.url}/v1/loads")[1]["loads"][0]["num_running_reqs"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert http("POST", f"{server.url}/flush_cache")[0] == 400  # busy: SGLang's rule
        engine.flush_cache()  # retries until the request is done
        assert pending.done() and pending.result()[0] == 200


@torch.no_grad()
def test_routed_experts_come_back_decoded_for_routing_replay(server, tiny_moe):
    from tests.rollout.conftest import load_model

    with SGLangEngine([server.url], routed_layout=(2, 2)) as engine:
        [[sample]] = engine.generate([[50, 51, 52]], SamplingParams(max_new_tokens=5, seed=3), n=1)
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    logits = load_model(str(tiny_moe))(ids, output_router_logits=True).router_logits
    reference = torch.stack([r.topk(2, -1).indices.sort(-1).values for r in logits], dim=1)[:-1]
    assert sample.routed_experts.shape == (3 + len(sample.response_ids) - 1, 2, 2)
    assert torch.equal(torch.from_numpy(sample.routed_experts).sort(-1).values.long(), reference)
