"""SGLang's native ``/generate`` JSON, written once for both sides (client and our server).

Field names and shapes follow sglang 0.5.23 (its ``io_struct.py`` and ``http_server.py``):
``sampling_params`` keys, ``meta_info.output_token_logprobs`` as positional triples
``[logprob, token_id, text|null]``, ``finish_reason`` as an object tagged by ``type``, and
``routed_experts`` as base64 int32. sglang's own request classes cannot be imported on CPU
(they need triton), so these small helpers are ours.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import numpy as np

from luspo_megatron.errors import RolloutError
from luspo_megatron.rollout.engine import FINISH_ABORT, FINISH_LENGTH, FINISH_STOP, Sample, SamplingParams

# Every key sglang 0.5.23 accepts in ``sampling_params``. Its contract gate answers any other key
# with HTTP 400, so the client sends a subset of these and our server rejects the rest the same way.
KNOWN_SAMPLING_KEYS = frozenset({
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema",
    "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
    "no_stop_trim", "custom_params", "stream_interval", "logit_bias", "sampling_seed", "beam_width",
    "watermark", "choice",
})

# sglang reads top_k "all" as 1 << 30; -1 is accepted as the same.
TOP_K_ALL = 1 << 30


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A per-(prompt, sample) seed derived from the call's seed.

    sglang expands ``n > 1`` into n copies of one request that share ``sampling_seed``, so a
    seeded group would be n identical samples. A seeded call therefore sends one request per
    sample, each with its own seed. A hash, not ``seed + i``, so that neighbouring calls
    (seed, seed + 1) do not share seeds across prompts.
    """
    digest = hashlib.blake2b(f"{seed}:{prompt_index}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**62 - 1)


def sampling_params_json(sampling: SamplingParams, n: int, seed: int | None) -> dict[str, Any]:
    """The ``sampling_params`` object for one request: known keys only (0.5.23 rejects others)."""
    params: dict[str, Any] = {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "max_new_tokens": sampling.max_new_tokens,
        "n": n,
        # Keep the stop token and its log-prob: the trainer trains on it (slime does the same).
        "no_stop_trim": True,
        "skip_special_tokens": False,
        "spaces_between_special_tokens": False,
    }
    if sampling.stop_token_ids:
        params["stop_token_ids"] = list(sampling.stop_token_ids)
    if seed is not None:
        params["sampling_seed"] = seed
    assert set(params) <= KNOWN_SAMPLING_KEYS
    return params


def generate_request(
    input_ids: list[int], sampling_params: dict[str, Any], *, rid: str | None = None,
    return_routed_experts: bool = False,
) -> dict[str, Any]:
    """A token-in/token-out ``/generate`` body with output log-probs (what slime sends)."""
    body: dict[str, Any] = {
        "input_ids": list(input_ids),
        "sampling_params": sampling_params,
        "return_logprob": True,
        "logprob_start_len": -1,  # output tokens only
    }
    if rid is not None:
        body["rid"] = rid
    if return_routed_experts:
        body["return_routed_experts"] = True
    return body


# ------------------------------------------------------------------------------ finish_reason objects
def finish_stop(matched: int | None) -> dict[str, Any]:
    return {"type": FINISH_STOP, "matched": matched}


def finish_length(length: int) -> dict[str, Any]:
    return {"type": FINISH_LENGTH, "length": length}


def finish_abort(message: str, status_code: int | None = None) -> dict[str, Any]:
    reason: dict[str, Any] = {"type": FINISH_ABORT, "message": message}
    if status_code is not None:
        reason["status_code"] = status_code
    return reason


def parse_finish_reason(reason: Any) -> str:
    """``{"type": "stop"|"length"|"abort", ...}`` -> the type. Raises RolloutError otherwise."""
    kind = reason.get("type") if isinstance(reason, dict) else None
    if kind not in (FINISH_STOP, FINISH_LENGTH, FINISH_ABORT):
        raise RolloutError(f"meta_info.finish_reason: expected an object with type stop|length|abort, got {reason!r}")
    return kind


# ------------------------------------------------------------------------------------ routed experts
def encode_routed_experts(experts: np.ndarray) -> str:
    """int32 [tokens, layers, top_k] -> base64 of the raw little-endian int32 values (sglang's form)."""
    return base64.b64encode(np.ascontiguousarray(experts, dtype="<i4").tobytes()).decode("ascii")


def decode_routed_experts(payload: str, num_layers: int, top_k: int) -> np.ndarray:
    """The inverse of :func:`encode_routed_experts`; the token count follows from the size."""
    flat = np.frombuffer(base64.b64decode(payload), dtype="<i4")
    if flat.size % (num_layers * top_k) != 0:
        raise RolloutError(
            f"meta_info.routed_experts: {flat.size} int32 values do not fill rows of layers×top_k = "
            f"{num_layers}×{top_k}"
        )
    return flat.reshape(-1, num_layers, top_k).astype(np.int32)


# --------------------------------------------------------------------------------- response parsing
def parse_output(
    output: Any, prompt_ids: list[int], *, routed_layout: tuple[int, int] | None = None,
) -> Sample:
    """One ``/generate`` output object -> :class:`Sample`. Unknown or missing optional
    ``meta_info`` keys are fine; a missing required one is a RolloutError naming it."""
    if not isinstance(output, dict):
        raise RolloutError(f"/generate: expected an output object, got {type(output).__name__}")
    meta = output.get("meta_info")
    if not isinstance(meta, dict):
        raise RolloutError("/generate: response has no meta_info object")
    finish = parse_finish_reason(meta.get("finish_reason"))
    output_ids = output.get("output_ids")
    triples = meta.get("output_token_logprobs")
    if not isinstance(triples, list):
        raise RolloutError("meta_info.output_token_logprobs: expected a list of [logprob, token_id, text] triples")
    if output_ids is None:  # tolerated: the ids are also in the triples
        output_ids = [t[1] for t in triples]
    if len(triples) != len(output_ids):
        raise RolloutError(
            f"meta_info.output_token_logprobs: {len(triples)} triples for {len(output_ids)} output_ids"
        )
    logp = []
    for t, (triple, token) in enumerate(zip(triples, output_ids)):
        if not (isinstance(triple, (list, tuple)) and len(triple) >= 2 and triple[1] == token
                and isinstance(triple[0], (int, float))):
            raise RolloutError(
                f"meta_info.output_token_logprobs[{t}]: expected [logprob, {token}, text], got {triple!r}"
            )
        logp.append(float(triple[0]))
    routed = None
    if routed_layout is not None and meta.get("routed_experts") is not None:
        routed = decode_routed_experts(meta["routed_experts"], *routed_layout)
    keep = ("id", "prompt_tokens", "completion_tokens", "cached_tokens", "e2e_latency", "weight_versions",
            "num_retractions", "total_retractions", "finish_reason")
    return Sample(
        prompt_ids=list(prompt_ids),
        response_ids=[int(t) for t in output_ids],
        rollout_logp=logp,
        finish=finish,
        weight_version=str(meta.get("weight_version", "default")),
        routed_experts=routed,
        meta={k: meta[k] for k in keep if k in meta},
    )
