"""Request bodies for our SGLang-API server: read them safely, validate ``/generate``, render its answer.

Every malformed or out-of-bounds body is answered before it reaches the model, with HTTP 400 and a
message that names the field (sglang's error body):

- the body: at most ``max_body_bytes`` (else HTTP 413), UTF-8, JSON (``NaN`` / ``Infinity`` and
  overflowing numbers read as non-finite and are refused where a number is expected), nested at most
  ``MAX_DEPTH`` deep; integers of more than ``MAX_INT_DIGITS`` digits are never converted (Python's
  own guard would raise for 4300 digits, with no field name), they are refused by the field check;
- ``input_ids``: one non-empty list of token ids, or a list of them, each id an integer (not a
  boolean) in ``[0, vocab)``, each prompt shorter than the context;
- ``sampling_params`` (one object, or one per prompt): sglang 0.5.23's key set (an unknown key is
  HTTP 400 with ``{"error": ...}``, as sglang's contract gate answers); finite numbers in range:
  ``temperature`` ≥ 0, ``top_p`` in (0, 1], ``top_k`` -1 or in [1, 2^30], ``max_new_tokens`` in
  [1, context − prompt] (absent: min(128, context − prompt)), ``n`` in [1, ``max_n``] with at most
  ``max_n`` samples per request in all, ``sampling_seed`` in [0, 2^64); ``stop_token_ids`` inside
  the vocabulary; booleans where sglang has booleans.

The result, a :class:`GenerateRequest`, carries one :class:`~.generation.GenRow` per sample and
collects their results for the scheduler.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from luspo_megatron.rollout import protocol
from luspo_megatron.rollout.local.generation import GenResult, GenRow

MAX_DEPTH = 32  # nesting of a /generate body is 4; anything near Python's recursion limit is an attack
MAX_INT_DIGITS = 40  # more digits than any id, count or 64-bit seed can have
MAX_RID_CHARS = 256
DEFAULT_MAX_NEW_TOKENS = 128  # sglang's default
SEED_LIMIT = 2**64  # torch.Generator takes seeds in [0, 2^64)

# Known sampling keys we accept only at their neutral value (we cannot honour anything else).
_NEUTRAL = {
    "stop": (None, "", []), "stop_regex": (None, "", []), "min_p": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0), "repetition_penalty": (None, 1, 1.0),
    "min_new_tokens": (None, 0), "json_schema": (None,), "regex": (None,), "ebnf": (None,),
    "structural_tag": (None,), "custom_params": (None, {}), "logit_bias": (None, {}), "beam_width": (None, 0, 1),
    "watermark": (None, False), "choice": (None,),
}


class BadRequest(Exception):
    """A body we cannot serve: HTTP 400 (or ``status``) with sglang's error body."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class UnknownSamplingKey(BadRequest):
    """sglang 0.5.23's contract gate: an unknown sampling_params key is HTTP 400 ``{"error": ...}``."""


class HugeInt:
    """A JSON integer with more than ``MAX_INT_DIGITS`` digits, kept unconverted: the field check that
    meets it refuses it by name."""

    def __init__(self, text: str) -> None:
        self.digits = len(text.lstrip("-"))

    def __repr__(self) -> str:
        return f"a {self.digits}-digit integer"


@dataclass(frozen=True)
class Limits:
    """What one /generate may ask for."""

    vocab_size: int
    context_length: int  # prompt + response tokens
    max_n: int = 1024  # samples per request, over all its prompts
    max_body_bytes: int = 64 * 2**20  # every body but /update_weights_from_tensor's
    max_tensor_body_bytes: int = 2**30  # /update_weights_from_tensor: CPU tensors travel pickled by value


@dataclass
class GenerateRequest:
    """One /generate call: its rows (prompt-major, sample-minor) and where their results go."""

    rid: str
    rows: list[GenRow]
    prompt_index: list[int]
    sample_ids: list[str]
    return_logprob: bool
    no_stop_trim: list[bool]  # per row (sampling_params may differ per prompt)
    want_routing: bool
    batched: bool  # the body held a list of prompts or n > 1: answer with a list
    results: list[GenResult | None] = field(default_factory=list)
    done: asyncio.Future | None = None
    pending: int = 0  # rows without a result yet: finishing a row is O(1), so aborts are linear
    started: float = field(default_factory=time.perf_counter)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self.results = [None] * len(self.rows)
        self.pending = len(self.rows)
        self.done = loop.create_future()
        # A request whose client left (or a health probe answered) may fail with nobody waiting:
        # mark its error as seen so asyncio does not log it as never retrieved.
        self.done.add_done_callback(lambda f: f.cancelled() or f.exception())

    def finish_row(self, index: int, result: GenResult) -> None:
        if self.results[index] is not None:
            return
        self.results[index] = result
        self.pending -= 1
        if self.pending == 0 and not self.done.done():
            self.done.set_result(None)

    def fail(self, error: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(error)


# ------------------------------------------------------------------------------------------- bodies
async def read_json(request: web.Request, max_bytes: int, *, empty: Any = None, flag: str = "--max-body-bytes") -> Any:
    """The request body as JSON: HTTP 413 past ``max_bytes``, 400 for anything that is not UTF-8
    JSON nested at most ``MAX_DEPTH`` deep. An empty body gives ``empty`` (400 when None)."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise BadRequest(f"body: {request.content_length} bytes exceeds the limit of {max_bytes} ({flag})",
                         status=413)
    raw = bytearray()
    async for chunk in request.content.iter_chunked(1 << 16):  # also bounds bodies sent without a length
        raw += chunk
        if len(raw) > max_bytes:
            raise BadRequest(f"body: more than {max_bytes} bytes ({flag})", status=413)
    if not raw.strip():
        if empty is None:
            raise BadRequest("body: expected a JSON object, got an empty body")
        return empty
    return parse_json(bytes(raw))


def parse_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadRequest(f"body: not valid UTF-8 (byte {err.start})") from None
    try:
        value = json.loads(text, parse_int=_parse_int, parse_constant=float)
    except RecursionError:
        raise BadRequest(f"body: JSON nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as err:
        raise BadRequest(f"body: not valid JSON ({err})") from None
    _check_depth(value)
    return value


def _parse_int(text: str) -> int | HugeInt:
    return HugeInt(text) if len(text.lstrip("-")) > MAX_INT_DIGITS else int(text)


def _check_depth(value: Any) -> None:
    stack = [(value, 1)]  # iterative: the check itself must not recurse
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > MAX_DEPTH:
                raise BadRequest(f"body: JSON nested more than {MAX_DEPTH} levels deep")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, (list, dict)))


# ------------------------------------------------------------------------------------- /generate
def parse_generate(
    body: Any, limits: Limits, *, draw_seed: Callable[[], int], eos_ids: frozenset[int]
) -> GenerateRequest:
    """Validate a /generate body (module docstring) and expand it into rows; BadRequest otherwise."""
    if not isinstance(body, dict):
        raise BadRequest(f"body: expected a JSON object, got {type(body).__name__}")
    for key in ("text", "input_embeds"):
        if body.get(key) is not None:
            raise BadRequest(f"{key}: only input_ids are supported by the luspo local server (token-in/token-out)")
    if _flag(body, "stream"):
        raise BadRequest("stream: not supported by the luspo local server")
    if body.get("top_logprobs_num") or body.get("token_ids_logprob"):
        raise BadRequest("top_logprobs_num / token_ids_logprob: not supported by the luspo local server")
    return_logprob = _flag(body, "return_logprob")
    start = _integer(body.get("logprob_start_len"), "logprob_start_len", -1, -1, 2**31)
    if start != -1 and return_logprob:
        raise BadRequest(f"logprob_start_len: only -1 (output tokens only) is supported, got {start}")
    want_routing = _flag(body, "return_routed_experts")
    rid = body.get("rid")
    if rid is None or rid == "":
        rid = uuid.uuid4().hex
    elif not isinstance(rid, str) or not 0 < len(rid) <= MAX_RID_CHARS:
        raise BadRequest(f"rid: expected a string of 1 to {MAX_RID_CHARS} characters, got {_show(rid)}")
    prompts, batched_input = _prompts(body.get("input_ids"), limits)
    params = body.get("sampling_params")
    per_prompt = params if isinstance(params, list) else [params] * len(prompts)
    if len(per_prompt) != len(prompts):
        raise BadRequest(f"sampling_params: {len(per_prompt)} entries for {len(prompts)} prompts")
    specs = [_sampling(sp, len(p), limits) for sp, p in zip(per_prompt, prompts)]
    total = sum(spec["n"] for spec in specs)
    if total > limits.max_n:
        raise BadRequest(f"n: {total} samples in all ({len(prompts)} prompts) exceeds --max-n {limits.max_n}")
    single = len(prompts) == 1
    rows, prompt_index, sample_ids, no_stop_trim = [], [], [], []
    for i, (prompt, spec) in enumerate(zip(prompts, specs)):
        stop = frozenset(spec["stop_token_ids"]) | (frozenset() if spec["ignore_eos"] else eos_ids)
        for j in range(spec["n"]):
            seed = spec["seed"]
            # n > 1 with one sampling_seed: derive one seed per sample so the n samples differ.
            row_seed = draw_seed() if seed is None else (
                seed if (spec["n"] == 1 and single) else protocol.sample_seed(seed, i, j))
            rows.append(GenRow(
                prompt_ids=prompt, max_new_tokens=spec["max_new_tokens"], seed=row_seed,
                temperature=spec["temperature"], top_p=spec["top_p"], top_k=spec["top_k"], stop_ids=stop,
                want_routing=want_routing, rid=rid,
            ))
            prompt_index.append(i)
            no_stop_trim.append(spec["no_stop_trim"])
            sample_ids.append(rid if spec["n"] == 1 and single else f"{rid}-{i}-{j}")
    return GenerateRequest(
        rid=rid, rows=rows, prompt_index=prompt_index, sample_ids=sample_ids, return_logprob=return_logprob,
        no_stop_trim=no_stop_trim, want_routing=want_routing, batched=batched_input or total > len(prompts),
    )


def generate_response(
    req: GenerateRequest, results: list[GenResult], weight_version: str, tokenizer: Any = None
) -> Any:
    """sglang's /generate answer for ``req``: one output object, or a list of them for a batched
    input or ``n > 1``."""
    latency = time.perf_counter() - req.started
    outputs = []
    for i, result in enumerate(results):
        row = req.rows[i]
        tokens, logp = list(result.tokens), list(result.logp)
        if result.finish == protocol.FINISH_STOP:
            reason = protocol.finish_stop(result.matched)
            if not req.no_stop_trim[i]:  # SGLang drops the matched stop token unless no_stop_trim
                tokens, logp = tokens[:-1], logp[:-1]
        elif result.finish == protocol.FINISH_LENGTH:
            reason = protocol.finish_length(len(tokens))
        else:
            reason = protocol.finish_abort(row.abort_message)
        meta: dict[str, Any] = {
            "id": req.sample_ids[i], "finish_reason": reason, "prompt_tokens": len(row.prompt_ids),
            "completion_tokens": len(tokens), "cached_tokens": 0, "reasoning_tokens": 0,
            "weight_version": weight_version, "num_retractions": 0, "dp_rank": None, "e2e_latency": latency,
        }
        if req.return_logprob:
            meta["output_token_logprobs"] = [[lp, tok, None] for lp, tok in zip(logp, tokens)]
        if req.want_routing and result.routed_experts is not None:
            meta["routed_experts"] = protocol.encode_routed_experts(result.routed_experts)
        text = tokenizer.decode(tokens, skip_special_tokens=False) if tokenizer else ""
        outputs.append({"text": text, "output_ids": tokens, "meta_info": meta})
    return outputs if req.batched else outputs[0]


def _prompts(ids: Any, limits: Limits) -> tuple[list[list[int]], bool]:
    expected = (f"expected a non-empty list of token ids in [0, {limits.vocab_size}) or a list of such lists")
    if not isinstance(ids, list) or not ids:
        raise BadRequest(f"input_ids: {expected}, got {_show(ids)}")
    batched = isinstance(ids[0], list)
    prompts = ids if batched else [ids]
    if batched and len(prompts) > limits.max_n:
        raise BadRequest(f"input_ids: {len(prompts)} prompts exceeds --max-n {limits.max_n}")
    for p, prompt in enumerate(prompts):
        where = f"input_ids[{p}]" if batched else "input_ids"
        if not isinstance(prompt, list) or not prompt:
            raise BadRequest(f"{where}: {expected}, got {_show(prompt)}")
        if len(prompt) >= limits.context_length:
            raise BadRequest(f"{where}: {len(prompt)} tokens; the context is {limits.context_length} tokens, so a "
                             f"prompt may have at most {limits.context_length - 1}")
        for t, token in enumerate(prompt):
            if not (type(token) is int and 0 <= token < limits.vocab_size):
                raise BadRequest(f"{where}[{t}]: expected a token id in [0, {limits.vocab_size}), got {_show(token)}")
    return prompts, batched


def _sampling(sp: Any, prompt_len: int, limits: Limits) -> dict[str, Any]:
    """Validate one ``sampling_params`` object the way sglang does, for the keys we serve."""
    if sp is None:
        sp = {}
    if not isinstance(sp, dict):
        raise BadRequest(f"sampling_params: expected an object, got {_show(sp)}")
    unknown = sorted(set(sp) - protocol.KNOWN_SAMPLING_KEYS)
    if unknown:
        expected = ", ".join(f"`{k}`" for k in sorted(protocol.KNOWN_SAMPLING_KEYS))
        raise UnknownSamplingKey(f"unknown field `{unknown[0]}`, expected one of {expected}")
    for key, neutral in _NEUTRAL.items():
        if key in sp and not any(type(sp[key]) is type(v) and sp[key] == v for v in neutral if v is not None) \
                and sp[key] is not None:
            raise BadRequest(f"sampling_params.{key}: not supported by the luspo local server (only its neutral "
                             f"value), got {_show(sp[key])}")
    room = limits.context_length - prompt_len  # ≥ 1: the prompt was checked against the context
    context = f" (the context is {limits.context_length} tokens and the prompt has {prompt_len})"
    top_k = _integer(sp.get("top_k"), "sampling_params.top_k", -1, -1, protocol.TOP_K_ALL)
    if top_k == 0:
        raise BadRequest("sampling_params.top_k: expected -1 or an integer in [1, 2^30], got 0")
    stop_ids = sp.get("stop_token_ids")
    if stop_ids is None:
        stop_ids = []
    if not isinstance(stop_ids, list):
        raise BadRequest(f"sampling_params.stop_token_ids: expected a list of token ids, got {_show(stop_ids)}")
    for k, token in enumerate(stop_ids):
        if not (type(token) is int and 0 <= token < limits.vocab_size):
            raise BadRequest(f"sampling_params.stop_token_ids[{k}]: expected a token id in [0, {limits.vocab_size}), "
                             f"got {_show(token)}")
    _integer(sp.get("stream_interval"), "sampling_params.stream_interval", 1, 1, 2**31)
    for key in ("skip_special_tokens", "spaces_between_special_tokens"):
        _flag(sp, key, where="sampling_params.")
    return {
        "temperature": _number(sp.get("temperature"), "sampling_params.temperature", 1.0, 0.0, math.inf),
        "top_p": _number(sp.get("top_p"), "sampling_params.top_p", 1.0, 0.0, 1.0, low_open=True),
        "top_k": -1 if top_k >= protocol.TOP_K_ALL else top_k,
        "max_new_tokens": _integer(sp.get("max_new_tokens"), "sampling_params.max_new_tokens",
                                   min(DEFAULT_MAX_NEW_TOKENS, room), 1, room, why=context),
        "n": _integer(sp.get("n"), "sampling_params.n", 1, 1, limits.max_n, why=" (--max-n)"),
        "seed": _integer(sp.get("sampling_seed"), "sampling_params.sampling_seed", None, 0, SEED_LIMIT - 1),
        "stop_token_ids": stop_ids,
        "ignore_eos": _flag(sp, "ignore_eos", where="sampling_params."),
        "no_stop_trim": _flag(sp, "no_stop_trim", where="sampling_params."),
    }


def _integer(value: Any, name: str, default: Any, low: int, high: int, why: str = "") -> Any:
    """An integer in [low, high] (an integral float such as 2.0 counts; a boolean does not)."""
    if value is None:
        return default
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        value = int(value)
    if type(value) is not int or not low <= value <= high:
        raise BadRequest(f"{name}: expected an integer in [{low}, {high}]{why}, got {_show(value)}")
    return value


def _number(value: Any, name: str, default: float, low: float, high: float, *, low_open: bool = False) -> float:
    """A finite number in [low, high] (or (low, high] with ``low_open``); not a boolean."""
    if value is None:
        return default
    ok = type(value) in (int, float) and math.isfinite(value) and (low < value if low_open else low <= value) \
        and value <= high
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise BadRequest(f"{name}: expected a finite number in {interval}, got {_show(value)}")
    return float(value)


def _flag(body: dict, key: str, *, where: str = "") -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"{where}{key}: expected true or false, got {_show(value)}")
    return value


def _show(value: Any) -> str:
    """A short, one-line rendering of a client's value for an error message."""
    text = repr(value) if not isinstance(value, HugeInt) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."
