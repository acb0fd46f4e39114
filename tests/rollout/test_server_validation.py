"""Our server as a service, over real HTTP: every malformed or out-of-bounds /generate body is refused
with a message that names the field, while valid requests sent at the same time are served exactly
as they would be alone; a request that fails inside a batch fails alone; low temperatures are greedy
with finite log-probs; aborting is linear in the rows."""

from __future__ import annotations

import asyncio
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from urllib.parse import urlparse

import pytest

from luspo_megatron.rollout.local.faults import FaultConfig
from tests.rollout.conftest import SERVER_MAX_BODY_BYTES, VOCAB, forward_logp, greedy, http

CONTEXT = 2048  # the tiny model's max_position_embeddings: the server's default context
VALID = {"input_ids": [21, 22, 23], "return_logprob": True, "rid": "valid",
         "sampling_params": {"max_new_tokens": 8, "temperature": 0.9, "sampling_seed": 4242, "no_stop_trim": True}}


def body(sampling: dict | None = None, **top) -> dict:
    """A valid single-prompt body with some sampling params or top-level fields replaced."""
    out = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 4, **(sampling or {})}}
    out.update(top)
    return out


def raw(text: str) -> bytes:
    return text.encode()


BIG = "9" * 5000  # a 5000-digit integer
# (case id, body: a dict sent as JSON or bytes sent as they are, the status, what the message must name)
CASES = [
    ("invalid_json", raw('{"input_ids": [1, 2'), 400, "JSON"),
    ("invalid_utf8", b'{"input_ids": [1], "rid": "\xff\xfe"}', 400, "UTF-8"),
    ("deep_nesting", raw('{"input_ids": [1], "x": ' + "[" * 5000 + "]" * 5000 + "}"), 400, "nested"),
    ("nesting_past_32", raw('{"input_ids": [1], "x": ' + "[" * 40 + "]" * 40 + "}"), 400, "nested"),
    ("body_is_a_list", [1, 2, 3], 400, "body"),
    ("body_is_a_string", "hello", 400, "body"),
    ("body_is_null", raw("null"), 400, "body"),
    ("empty_body", b"", 400, "body"),
    ("nan_temperature", raw('{"input_ids": [1], "sampling_params": {"temperature": NaN}}'), 400, "temperature"),
    ("inf_max_new_tokens", raw('{"input_ids": [1], "sampling_params": {"max_new_tokens": Infinity}}'), 400,
     "max_new_tokens"),
    ("neg_inf_top_p", raw('{"input_ids": [1], "sampling_params": {"top_p": -Infinity}}'), 400, "top_p"),
    ("overflowing_float", raw('{"input_ids": [1], "sampling_params": {"temperature": 1e999}}'), 400, "temperature"),
    ("huge_int_max_new_tokens", raw('{"input_ids": [1], "sampling_params": {"max_new_tokens": ' + BIG + "}}"), 400,
     "max_new_tokens"),
    ("huge_int_token", raw('{"input_ids": [1, ' + BIG + "]}"), 400, "input_ids[1]"),
    ("huge_int_seed", raw('{"input_ids": [1], "sampling_params": {"sampling_seed": ' + BIG + "}}"), 400,
     "sampling_seed"),
    ("no_input_ids", {}, 400, "input_ids"),
    ("text_instead", {"text": "hello"}, 400, "text"),
    ("input_embeds", {"input_embeds": [[0.1, 0.2]]}, 400, "input_embeds"),
    ("input_ids_empty", {"input_ids": []}, 400, "input_ids"),
    ("input_ids_empty_prompt", {"input_ids": [[]]}, 400, "input_ids[0]"),
    ("input_ids_null", {"input_ids": None}, 400, "input_ids"),
    ("input_ids_object", {"input_ids": {"a": 1}}, 400, "input_ids"),
    ("input_ids_boolean", {"input_ids": [True, 2]}, 400, "input_ids[0]"),
    ("input_ids_float", {"input_ids": [1, 2.5]}, 400, "input_ids[1]"),
    ("input_ids_string", {"input_ids": ["1"]}, 400, "input_ids[0]"),
    ("input_ids_negative", {"input_ids": [3, -1]}, 400, "input_ids[1]"),
    ("input_ids_past_vocab", {"input_ids": [3, VOCAB]}, 400, "input_ids[1]"),
    ("input_ids_mixed_batch", {"input_ids": [[1, 2], 3]}, 400, "input_ids[1]"),
    ("prompt_fills_the_context", {"input_ids": [1] * CONTEXT}, 400, "input_ids"),
    ("too_many_prompts", {"input_ids": [[1]] * 1025}, 400, "--max-n"),
    ("sampling_params_string", body(sampling_params="hot"), 400, "sampling_params"),
    ("sampling_params_per_prompt_mismatch", {"input_ids": [[1], [2]], "sampling_params": [{}]}, 400,
     "sampling_params"),
    ("unknown_sampling_key", body({"foo": 1}), 400, "foo"),
    ("temperature_negative", body({"temperature": -0.5}), 400, "temperature"),
    ("temperature_string", body({"temperature": "hot"}), 400, "temperature"),
    ("temperature_boolean", body({"temperature": True}), 400, "temperature"),
    ("top_p_zero", body({"top_p": 0}), 400, "top_p"),
    ("top_p_above_one", body({"top_p": 1.5}), 400, "top_p"),
    ("top_p_boolean", body({"top_p": False}), 400, "top_p"),
    ("top_k_zero", body({"top_k": 0}), 400, "top_k"),
    ("top_k_minus_two", body({"top_k": -2}), 400, "top_k"),
    ("top_k_fraction", body({"top_k": 1.5}), 400, "top_k"),
    ("top_k_boolean", body({"top_k": True}), 400, "top_k"),
    ("top_k_past_2_30", body({"top_k": 2**40}), 400, "top_k"),
    ("max_new_tokens_zero", body({"max_new_tokens": 0}), 400, "max_new_tokens"),
    ("max_new_tokens_negative", body({"max_new_tokens": -1}), 400, "max_new_tokens"),
    ("max_new_tokens_1e9", body({"max_new_tokens": 10**9}), 400, "max_new_tokens"),
    ("max_new_tokens_one_past_the_context", body({"max_new_tokens": CONTEXT - 3 + 1}), 400, "max_new_tokens"),
    ("max_new_tokens_boolean", body({"max_new_tokens": True}), 400, "max_new_tokens"),
    ("max_new_tokens_fraction", body({"max_new_tokens": 2.5}), 400, "max_new_tokens"),
    ("max_new_tokens_string", body({"max_new_tokens": "10"}), 400, "max_new_tokens"),
    ("n_zero", body({"n": 0}), 400, "sampling_params.n"),
    ("n_past_max_n", body({"n": 1025}), 400, "sampling_params.n"),
    ("n_million", body({"n": 10**6}), 400, "sampling_params.n"),
    ("n_boolean", body({"n": True}), 400, "sampling_params.n"),
    ("n_fraction", body({"n": 1.5}), 400, "sampling_params.n"),
    ("n_times_prompts_past_max_n", {"input_ids": [[1], [2]], "sampling_params": {"n": 600}}, 400, "n:"),
    ("seed_2_70", body({"sampling_seed": 2**70}), 400, "sampling_seed"),
    ("seed_2_64", body({"sampling_seed": 2**64}), 400, "sampling_seed"),
    ("seed_negative", body({"sampling_seed": -1}), 400, "sampling_seed"),
    ("seed_boolean", body({"sampling_seed": True}), 400, "sampling_seed"),
    ("seed_fraction", body({"sampling_seed": 1.5}), 400, "sampling_seed"),
    ("seed_string", body({"sampling_seed": "7"}), 400, "sampling_seed"),
    ("stop_token_ids_number", body({"stop_token_ids": 5}), 400, "stop_token_ids"),
    ("stop_token_ids_boolean", body({"stop_token_ids": [True]}), 400, "stop_token_ids[0]"),
    ("stop_token_ids_past_vocab", body({"stop_token_ids": [2, VOCAB + 7]}), 400, "stop_token_ids[1]"),
    ("stop_token_ids_string", body({"stop_token_ids": ["a"]}), 400, "stop_token_ids[0]"),
    ("stop_token_ids_nan", raw('{"input_ids": [1], "sampling_params": {"stop_token_ids": [NaN]}}'), 400,
     "stop_token_ids[0]"),
    ("ignore_eos_string", body({"ignore_eos": "yes"}), 400, "ignore_eos"),
    ("no_stop_trim_number", body({"no_stop_trim": 1}), 400, "no_stop_trim"),
    ("skip_special_tokens_string", body({"skip_special_tokens": "no"}), 400, "skip_special_tokens"),
    ("min_p_not_neutral", body({"min_p": 0.5}), 400, "min_p"),
    ("repetition_penalty_nan", raw('{"input_ids": [1], "sampling_params": {"repetition_penalty": NaN}}'), 400,
     "repetition_penalty"),
    ("stream_true", body(stream=True), 400, "stream"),
    ("return_logprob_string", body(return_logprob="yes"), 400, "return_logprob"),
    ("return_routed_experts_number", body(return_routed_experts=2), 400, "return_routed_experts"),
    ("rid_number", body(rid=5), 400, "rid"),
    ("rid_too_long", body(rid="r" * 1000), 400, "rid"),
    ("logprob_start_len_0", body(return_logprob=True, logprob_start_len=0), 400, "logprob_start_len"),
    ("top_logprobs_num", body(top_logprobs_num=5), 400, "top_logprobs_num"),
    ("body_past_the_limit", body(pad="x" * SERVER_MAX_BODY_BYTES), 413, "body"),
]


def send(url: str, payload) -> tuple[int, object]:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return http("POST", f"{url}/generate", raw=data)


def message(out) -> str:
    assert isinstance(out, dict), out
    return out.get("message") or out.get("error") or ""


@pytest.fixture(scope="module")
def alone(server):
    status, out = send(server.url, VALID)
    assert status == 200 and out["meta_info"]["finish_reason"]["type"] in ("length", "stop")
    return out


def same_output(out: dict, alone: dict) -> bool:
    """Same tokens; the same log-probs up to the float32 round-off that batching moves them by."""
    a, b = out["meta_info"]["output_token_logprobs"], alone["meta_info"]["output_token_logprobs"]
    return out["output_ids"] == alone["output_ids"] and all(abs(x[0] - y[0]) < 1e-5 for x, y in zip(a, b))


def test_the_table_has_at_least_60_cases():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("payload", "status", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_body_is_refused_naming_the_field_and_a_concurrent_valid_request_is_served_exactly(
        server, alone, payload, status, field):
    with ThreadPoolExecutor(2) as pool:
        bad = pool.submit(send, server.url, payload)
        good = pool.submit(send, server.url, VALID)
        (bad_status, bad_out), (good_status, good_out) = bad.result(), good.result()
    assert bad_status == status, bad_out
    assert field in message(bad_out), message(bad_out)
    assert len(message(bad_out)) < 600 and "\n" not in message(bad_out)  # one line, not a traceback
    assert good_status == 200 and same_output(good_out, alone)


def test_a_chunked_body_past_the_limit_is_refused_before_it_is_all_read(server):
    # No Content-Length: the server counts what it reads and stops at the limit.
    parts = urlparse(server.url)
    connection = HTTPConnection(parts.hostname, parts.port, timeout=30)
    chunks = [b'{"input_ids": [1], "pad": "'] + [b"x" * 65536] * (SERVER_MAX_BODY_BYTES // 65536 + 2) + [b'"}']
    connection.request("POST", "/generate", body=iter(chunks), headers={"Content-Type": "application/json"},
                       encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 413 and "max-body-bytes" in json.loads(response.read())["message"]
    connection.close()


LONG = [9] * (CONTEXT - 6)  # a prompt that leaves room for 6 new tokens


@pytest.mark.parametrize(("prompt", "sampling"), [
    (LONG, {"max_new_tokens": 6, "ignore_eos": True}), ([5, 6, 7], {"sampling_seed": 2**64 - 1}),
    ([5, 6, 7], {"top_k": 2**30}), ([5, 6, 7], {"n": 3, "top_p": 1}),
    ([5, 6, 7], {"temperature": 0, "stop_token_ids": [VOCAB - 1]}), ([5, 6, 7], {"max_new_tokens": 2.0}),
    ([5, 6, 7], {"min_p": 0.0, "stop": None}), ([VOCAB - 1, 0], {}),
], ids=["max_new_tokens_fills_the_context", "seed_2_64_minus_1", "top_k_2_30", "n_3", "greedy_stop_id",
        "integral_float", "neutral_values", "first_and_last_token_ids"])
def test_bounds_themselves_are_accepted(server, prompt, sampling):
    status, out = send(server.url, {"input_ids": prompt, "sampling_params": {"max_new_tokens": 2, **sampling}})
    assert status == 200, out
    outputs = out if isinstance(out, list) else [out]
    assert len(outputs) == sampling.get("n", 1)
    assert all(0 < o["meta_info"]["completion_tokens"] <= int(sampling.get("max_new_tokens", 2)) for o in outputs)


def test_the_server_stays_healthy_after_the_fuzz(server, alone):
    assert http("GET", f"{server.url}/health_generate")[0] == 200
    status, out = send(server.url, VALID)
    assert status == 200 and same_output(out, alone)


def test_a_seed_of_2_70_is_refused_alone_and_ten_concurrent_valid_requests_all_succeed(server, alone):
    # The reported defect: this seed reached the batch, and torch refused it for the whole batch (8 of
    # 10 valid requests answered 500).
    payloads = [VALID] * 10 + [{**VALID, "rid": "bad", "sampling_params": {**VALID["sampling_params"],
                                                                          "sampling_seed": 2**70}}]
    with ThreadPoolExecutor(len(payloads)) as pool:
        results = list(pool.map(lambda p: send(server.url, p), payloads))
    assert results[-1][0] == 400 and "sampling_seed" in message(results[-1][1])
    assert all(status == 200 and same_output(out, alone) for status, out in results[:-1])


def set_faults(server, **faults) -> None:
    assert http("POST", f"{server.url}/luspo/faults", FaultConfig(**faults).to_json())[0] == 200


def test_a_request_that_fails_inside_a_batch_fails_alone(server, alone):
    # A request that passes validation and then breaks generation (injected): its batch is re-run one
    # request at a time, so it alone answers 500 and the others are served exactly.
    before = http("GET", f"{server.url}/server_info")[1]["internal_states"][0]
    set_faults(server, poison_rid="poisoned")
    try:
        payloads = [{**VALID, "rid": f"good-{i}"} for i in range(6)] + [{**VALID, "rid": "poisoned"}]
        with ThreadPoolExecutor(len(payloads)) as pool:
            results = list(pool.map(lambda p: send(server.url, p), payloads))
    finally:
        set_faults(server)
    after = http("GET", f"{server.url}/server_info")[1]["internal_states"][0]
    assert results[-1][0] == 500 and "poisoned" in message(results[-1][1])
    assert all(status == 200 and same_output(out, alone) for status, out in results[:-1])
    assert after["failed_requests"] - before["failed_requests"] == 1
    assert after["isolated_batches"] > before["isolated_batches"]


@pytest.mark.parametrize("temperature", [0.0, 1e-38, 5e-7], ids=["zero", "1e-38", "5e-7"])
def test_a_temperature_below_1e_6_is_greedy_with_finite_t1_log_probs(server, tiny_moe, temperature):
    # The convention (generation.GREEDY_BELOW, sglang's _SAMPLING_EPS): T < 1e-6 samples argmax(logits)
    # and reports log_softmax(logits)[y], the T = 1 value. 1e-38 used to give NaN log-probs.
    prompt = [31, 32, 33]
    payload = {"input_ids": prompt, "return_logprob": True,
               "sampling_params": {"temperature": temperature, "max_new_tokens": 8, "ignore_eos": True}}
    status, out = send(server.url, payload)
    assert status == 200, out
    logp = [entry[0] for entry in out["meta_info"]["output_token_logprobs"]]
    assert out["output_ids"] == greedy(tiny_moe, prompt, 8)
    assert all(math.isfinite(x) for x in logp)
    reference = forward_logp(tiny_moe, prompt, out["output_ids"], temperature=1.0)
    assert max(abs(a - b) for a, b in zip(logp, reference)) < 1e-5


def test_a_temperature_of_1e_6_samples_with_finite_log_probs(server, tiny_moe):
    # At the threshold itself the row samples at T = 1e-6: log_softmax(logits / 1e-6) is finite and,
    # for these logits, the argmax with log-prob ≈ 0.
    prompt = [31, 32, 33]
    status, out = send(server.url, {"input_ids": prompt, "return_logprob": True, "sampling_params": {
        "temperature": 1e-6, "max_new_tokens": 8, "ignore_eos": True, "sampling_seed": 1}})
    assert status == 200
    logp = [entry[0] for entry in out["meta_info"]["output_token_logprobs"]]
    reference = forward_logp(tiny_moe, prompt, out["output_ids"], temperature=1e-6)
    assert all(math.isfinite(x) for x in logp) and max(abs(a - b) for a, b in zip(logp, reference)) < 1e-4


def test_aborting_a_huge_request_is_linear_in_its_rows():
    # 20 000 waiting rows (the HTTP limit is --max-n; the scheduler itself must not care): the old
    # abort was quadratic (every finished row re-scanned all results: 2·10^8 steps here).
    from luspo_megatron.rollout.local.generation import GenRow
    from luspo_megatron.rollout.local.requests import GenerateRequest
    from luspo_megatron.rollout.local.scheduler import Scheduler

    rows = 20_000

    async def scenario() -> tuple[float, int, list]:
        scheduler = Scheduler(lambda batch: [], max_running=64)
        await scheduler.start()
        scheduler.unpaused.clear()  # paused: the rows stay in the waiting queue
        request = GenerateRequest(rid="huge", rows=[GenRow([1], 1, seed=0) for _ in range(rows)],
                                  prompt_index=[0] * rows, sample_ids=[f"huge-0-{j}" for j in range(rows)],
                                  return_logprob=False, no_stop_trim=[True] * rows, want_routing=False, batched=True)
        scheduler.submit(request)
        started = time.perf_counter()
        count = scheduler.abort("huge", "Abort by abort_request")
        await asyncio.wait_for(request.done, 3)
        elapsed = time.perf_counter() - started
        await scheduler.stop()
        return elapsed, count, request.results

    elapsed, count, results = asyncio.run(scenario())
    assert count == rows and len(results) == rows and all(r.finish == "abort" for r in results)
    assert elapsed < 3.0  # linear: ≈ 0.05 s here
