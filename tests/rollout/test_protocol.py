"""sglang 0.5.23 /generate JSON: parsing of outputs, finish reasons, routed experts, request keys."""

from __future__ import annotations

import numpy as np
import pytest

from luspo_megatron.errors import RolloutError
from luspo_megatron.rollout.engine import Sample, SamplingParams
from luspo_megatron.rollout.protocol import (
    KNOWN_SAMPLING_KEYS,
    decode_routed_experts,
    encode_routed_experts,
    generate_request,
    parse_finish_reason,
    parse_output,
    sample_seed,
    sampling_params_json,
)

# The documented example response (sglang_api.md §1.1), trimmed to three tokens.
DOC_EXAMPLE = {
    "text": " 2+", "output_ids": [220, 17, 10],
    "meta_info": {"id": "fc52", "finish_reason": {"type": "stop", "matched": 151645}, "prompt_tokens": 15,
                  "completion_tokens": 3, "cached_tokens": 0, "reasoning_tokens": 0, "weight_version": "3",
                  "num_retractions": 0, "dp_rank": None, "cached_tokens_details": None,
                  "output_token_logprobs": [[-0.0012, 220, None], [-0.31, 17, None], [-0.0001, 10, None]],
                  "e2e_latency": 1.17, "response_sent_to_client_ts": 1777407489.01, "brand_new_key": 1},
}


def test_parse_output_reads_the_documented_response():
    sample = parse_output(DOC_EXAMPLE, [1, 2])
    assert isinstance(sample, Sample)
    assert sample.response_ids == [220, 17, 10] and sample.rollout_logp == [-0.0012, -0.31, -0.0001]
    assert sample.finish == "stop" and sample.weight_version == "3" and sample.prompt_ids == [1, 2]


def test_missing_optional_meta_keys_are_fine_and_required_ones_are_named():
    meta = {"finish_reason": {"type": "length", "length": 1}, "output_token_logprobs": [[-1.0, 5, None]]}
    sample = parse_output({"output_ids": [5], "meta_info": meta}, [1])
    assert sample.weight_version == "default" and sample.finish == "length"
    with pytest.raises(RolloutError, match="output_token_logprobs"):
        parse_output({"output_ids": [5], "meta_info": {"finish_reason": {"type": "stop"}}}, [1])
    with pytest.raises(RolloutError, match=r"output_token_logprobs\[0\]: expected \[logprob, 5, text\]"):
        parse_output({"output_ids": [5], "meta_info": {**meta, "output_token_logprobs": [[-1.0, 6, None]]}}, [1])
    with pytest.raises(RolloutError, match="no meta_info"):
        parse_output({"output_ids": [5]}, [1])


@pytest.mark.parametrize("reason,kind", [({"type": "stop", "matched": 3}, "stop"), ({"type": "length", "length": 9},
                                         "length"), ({"type": "abort", "message": "x", "status_code": 400}, "abort")])
def test_finish_reason_objects(reason, kind):
    assert parse_finish_reason(reason) == kind


@pytest.mark.parametrize("bad", [None, "stop", {"type": "eos"}, {}])
def test_unknown_finish_reasons_are_rollout_errors(bad):
    with pytest.raises(RolloutError, match="finish_reason"):
        parse_finish_reason(bad)


def test_routed_experts_round_trip_as_base64_int32():
    experts = np.random.default_rng(0).integers(0, 128, size=(7, 3, 2)).astype(np.int32)
    payload = encode_routed_experts(experts)
    assert np.array_equal(decode_routed_experts(payload, 3, 2), experts)
    # Independent decoding of the wire format: little-endian int32 values, row-major.
    import base64
    assert list(np.frombuffer(base64.b64decode(payload), "<i4")[:4]) == list(experts.reshape(-1)[:4])
    with pytest.raises(RolloutError, match="layers×top_k"):
        decode_routed_experts(payload, 4, 2)


def test_requests_carry_only_known_sampling_keys_and_ask_for_logprobs():
    params = sampling_params_json(SamplingParams(0.7, 0.9, 20, 33, (5, 6), seed=1), n=4, seed=99)
    assert set(params) <= KNOWN_SAMPLING_KEYS
    assert params["stop_token_ids"] == [5, 6] and params["sampling_seed"] == 99 and params["no_stop_trim"]
    body = generate_request([1, 2], params, return_routed_experts=True)
    assert body["return_logprob"] is True and body["return_routed_experts"] is True
    assert sampling_params_json(SamplingParams(), 1, None).keys().isdisjoint({"sampling_seed", "stop_token_ids"})


def test_per_sample_seeds_differ_and_repeat():
    seeds = {sample_seed(7, i, j) for i in range(20) for j in range(8)}
    assert len(seeds) == 160 and sample_seed(7, 3, 2) == sample_seed(7, 3, 2) != sample_seed(8, 3, 2)


def test_bad_sampling_params_are_one_line_config_errors():
    from luspo_megatron.errors import ConfigError

    for kwargs, field in (({"top_p": 0}, "top_p"), ({"top_k": 0}, "top_k"), ({"max_new_tokens": 0}, "max_new_tokens"),
                          ({"temperature": -1}, "temperature")):
        with pytest.raises(ConfigError, match=f"^{field}: expected"):
            SamplingParams(**kwargs)
