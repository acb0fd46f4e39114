"""Our SGLang-API server: SGLang's native HTTP API in front of a transformers model.

Same request and response JSON as sglang 0.5.23 for everything an RL trainer uses
(``/work/shared/reference/sglang_api.md``): ``/generate`` (token ids in and out, ``n``, stop ids,
sampling params, ``sampling_seed``, log-prob triples, ``finish_reason`` objects, ``meta_info`` with
``weight_version``, ``return_routed_experts``), ``/health``, ``/health_generate``, ``/model_info``
(and ``/get_model_info``), ``/server_info`` (and ``/get_server_info``), ``/v1/loads``,
``/flush_cache``, ``/abort_request``, ``/pause_generation``, ``/continue_generation``,
``/update_weights_from_disk``, ``/init_weights_update_group``, ``/update_weights_from_distributed``,
``/destroy_weights_update_group``, ``/update_weights_from_tensor``. A test-only route,
``POST /luspo/faults``, sets fault injection (:mod:`luspo_megatron.rollout.local.faults`).

Scheduling: every ``/generate`` becomes rows (one per sample) in a waiting queue. One batch loop
takes up to ``max_running_requests`` rows at a time and runs them through
:class:`~luspo_megatron.rollout.local.generation.TransformersGenerator` (one ``model.generate`` call, KV
cache) on a single worker thread; rows that arrive meanwhile wait for the next batch. Weight
updates take the model lock, so they land between batches, never inside one.

Run it with ``python tools/serve_local.py --hf-dir DIR --port PORT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from aiohttp import web

from luspo_megatron.rollout import protocol, weight_sync
from luspo_megatron.rollout.local.faults import FaultConfig, FaultInjector
from luspo_megatron.rollout.local.generation import GenResult, GenRow, TransformersGenerator

log = logging.getLogger(__name__)

SERVER_VERSION = "luspo-local-0.1"
HEALTH_TIMEOUT_S = 20.0  # SGLANG_HEALTH_CHECK_TIMEOUT's default
FLUSH_OK = ("Cache flushed.\nPlease check backend logs for more details. (When there are running or waiting "
            "requests, the operation will not be performed.)\n")

# Known sampling keys we accept only at their neutral value (we cannot honour anything else).
_NEUTRAL = {
    "stop": (None, "", []), "stop_regex": (None, "", []), "min_p": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0), "repetition_penalty": (None, 1, 1.0),
    "min_new_tokens": (None, 0), "json_schema": (None,), "regex": (None,), "ebnf": (None,),
    "structural_tag": (None,), "custom_params": (None, {}), "logit_bias": (None, {}), "beam_width": (None, 0, 1),
    "watermark": (None, False), "choice": (None,),
}


class BadRequest(Exception):
    """A /generate body we cannot serve: HTTP 400 with SGLang's error body."""


@dataclass
class _Request:
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
    started: float = field(default_factory=time.perf_counter)

    def finish_row(self, index: int, result: GenResult) -> None:
        self.results[index] = result
        if all(r is not None for r in self.results) and not self.done.done():
            self.done.set_result(None)

    def fail(self, error: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(error)


def _error_body(message: str, status: int = 400) -> web.Response:
    kind = "Bad Request" if status == 400 else "InternalServerError"
    return web.json_response({"object": "error", "message": message, "type": kind, "param": None, "code": status},
                             status=status)


def _control(success: bool, message: str, **extra: Any) -> web.Response:
    return web.json_response({"success": success, "message": message, **extra}, status=200 if success else 400)


class SGLangAPIServer:
    """The aiohttp application and its scheduler. Build with :meth:`app`, serve with aiohttp."""

    def __init__(
        self, generator: TransformersGenerator, *, max_running_requests: int = 64, seed: int = 0,
        faults: FaultConfig | None = None, weight_version: str = "default", tokenizer: Any = None,
    ) -> None:
        self.generator = generator
        self.max_running = max_running_requests
        self.faults = FaultInjector(faults)
        self.weight_version = weight_version
        self.tokenizer = tokenizer
        self._rng = random.Random(seed)  # seeds of requests without sampling_seed
        self._waiting: deque[tuple[_Request, int]] = deque()
        self._running: list[tuple[_Request, int]] = []
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="generate")  # all model work, in order
        self._comm_executor = ThreadPoolExecutor(2, thread_name_prefix="weight-comm")
        self._groups: dict[str, weight_sync.UpdateGroup] = {}
        self._last_throughput = 0.0
        self._started = time.time()
        self.batches = 0  # generate() calls so far, and the largest batch: batching is observable
        self.max_batch_rows = 0

    # ------------------------------------------------------------------------------------ app
    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)
        r = app.router
        r.add_route("POST", "/generate", self.generate)
        r.add_route("PUT", "/generate", self.generate)
        for path in ("/health", "/health_generate"):
            r.add_get(path, self.health)
        for path in ("/model_info", "/get_model_info"):
            r.add_get(path, self.model_info)
        for path in ("/server_info", "/get_server_info"):
            r.add_get(path, self.server_info)
        r.add_get("/v1/loads", self.loads)
        r.add_route("*", "/flush_cache", self.flush_cache)
        r.add_post("/abort_request", self.abort_request)
        r.add_post("/pause_generation", self.pause_generation)
        r.add_post("/continue_generation", self.continue_generation)
        r.add_post("/update_weights_from_disk", self.update_weights_from_disk)
        r.add_post("/init_weights_update_group", self.init_weights_update_group)
        r.add_post("/destroy_weights_update_group", self.destroy_weights_update_group)
        r.add_post("/update_weights_from_distributed", self.update_weights_from_distributed)
        r.add_post("/update_weights_from_tensor", self.update_weights_from_tensor)
        r.add_post("/luspo/faults", self.set_faults)
        r.add_get("/luspo/faults", self.get_faults)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        self._work = asyncio.Event()
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        self._model_lock = asyncio.Lock()
        self._loop_task = asyncio.create_task(self._batch_loop())

    async def _on_cleanup(self, app: web.Application) -> None:
        self._loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._loop_task
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._comm_executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------------ scheduler
    def _enqueue(self, request: _Request) -> None:
        request.results = [None] * len(request.rows)
        request.done = asyncio.get_running_loop().create_future()
        self._waiting.extend((request, i) for i in range(len(request.rows)))
        self._work.set()

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._work.wait()
            await self._unpaused.wait()
            await self._gather()
            async with self._model_lock:
                if not self._unpaused.is_set():  # paused while we waited for the lock
                    continue
                batch = []
                while self._waiting and len(batch) < self.max_running:
                    batch.append(self._waiting.popleft())
                if not self._waiting:
                    self._work.clear()
                if not batch:
                    continue
                self._running = batch
                self.batches += 1
                self.max_batch_rows = max(self.max_batch_rows, len(batch))
                started = time.perf_counter()
                try:
                    results = await loop.run_in_executor(
                        self._executor, self.generator.generate, [req.rows[i] for req, i in batch]
                    )
                except Exception as err:  # a bug or OOM: fail these requests, keep serving
                    log.exception("generation failed")
                    for req, _ in batch:
                        req.fail(err)
                    continue
                finally:
                    self._running = []
                tokens = sum(len(res.tokens) for res in results)
                self._last_throughput = tokens / max(time.perf_counter() - started, 1e-9)
                for (req, i), result in zip(batch, results):
                    req.finish_row(i, result)

    async def _gather(self, quiet_s: float = 0.005, max_wait_s: float = 0.05) -> None:
        """Let a burst of requests arrive before a batch starts. A rollout sends one HTTP request
        per sample, over a few milliseconds; starting on the first would run them as a string of
        tiny batches (the batch is static while it generates). Wait until the queue stops growing
        for ``quiet_s``, the batch is full, or ``max_wait_s`` passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_wait_s
        seen = -1
        while seen != len(self._waiting) and len(self._waiting) < self.max_running and loop.time() < deadline:
            seen = len(self._waiting)
            await asyncio.sleep(quiet_s)

    def _abort(self, rid: str | None, message: str) -> int:
        """Abort waiting and running rows (all of them when ``rid`` is None). Returns how many."""
        count = 0
        keep = deque()
        for req, i in self._waiting:
            if rid is None or rid in (req.rid, req.sample_ids[i]):
                req.rows[i].abort_message = "Abort in waiting queue"
                req.finish_row(i, GenResult(tokens=[], logp=[], finish=protocol.FINISH_ABORT))
                count += 1
            else:
                keep.append((req, i))
        self._waiting = keep
        for req, i in self._running:
            if rid is None or rid in (req.rid, req.sample_ids[i]):
                req.rows[i].abort_message = message
                req.rows[i].aborted.set()
                count += 1
        return count

    # ------------------------------------------------------------------------------- /generate
    async def generate(self, request: web.Request) -> web.StreamResponse:
        fault = self.faults.generate()
        if fault == "exit":  # a hard crash: no answer, no clean-up, like a killed or OOM'd server
            log.error("injected fault: exiting")
            os._exit(3)
        if self.faults.config.slow_s:
            await asyncio.sleep(self.faults.config.slow_s)
        if fault == "error_500":
            return _error_body("injected fault: HTTP 500", status=500)
        if fault == "drop":
            request.transport.close()  # the client sees the connection die with no answer
            return web.Response(status=500)
        try:
            body = await request.json()
            req = self._parse_generate(body)
        except json.JSONDecodeError:
            return _error_body("request body is not valid JSON")
        except BadRequest as err:
            return _error_body(str(err))
        except UnknownSamplingKey as err:
            return web.json_response({"error": str(err)}, status=400)
        if fault == "abort":
            results = [GenResult(tokens=[], logp=[], finish=protocol.FINISH_ABORT) for _ in req.rows]
            for row in req.rows:
                row.abort_message = "injected fault: abort"
            return web.json_response(self._response(req, results))
        await self._unpaused.wait()  # while paused, new requests wait here (SGLang's is_pause_cond)
        self._enqueue(req)
        try:
            await req.done
        except Exception as err:
            return _error_body(f"generation failed: {err}", status=500)
        return web.json_response(self._response(req, req.results))

    def _parse_generate(self, body: Any) -> _Request:
        if not isinstance(body, dict):
            raise BadRequest("expected a JSON object")
        if body.get("text") is not None or body.get("input_embeds") is not None:
            raise BadRequest("only input_ids are supported by the luspo local server (token-in/token-out)")
        if body.get("stream"):
            raise BadRequest("stream: not supported by the luspo local server")
        if body.get("top_logprobs_num") or body.get("token_ids_logprob"):
            raise BadRequest("top_logprobs_num / token_ids_logprob: not supported by the luspo local server")
        start = body.get("logprob_start_len", -1)
        if start not in (-1, None) and body.get("return_logprob"):
            raise BadRequest("logprob_start_len: only -1 (output tokens only) is supported")
        ids = body.get("input_ids")
        batched_input = isinstance(ids, list) and bool(ids) and isinstance(ids[0], list)
        prompts = ids if batched_input else [ids]
        for p in prompts:
            if not (isinstance(p, list) and p and all(isinstance(t, int) and 0 <= t < self.generator.vocab_size
                                                      for t in p)):
                raise BadRequest(f"input_ids: expected a non-empty list of token ids in [0, "
                                 f"{self.generator.vocab_size}) or a list of such lists")
        params = body.get("sampling_params") or {}
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise BadRequest(f"sampling_params: {len(per_prompt)} entries for {len(prompts)} prompts")
        rid = body.get("rid") or uuid.uuid4().hex
        if not isinstance(rid, str):
            raise BadRequest("rid: expected a string")
        want_routing = bool(body.get("return_routed_experts", False))
        rows, prompt_index, sample_ids, no_stop_trim = [], [], [], []
        n_total = 0
        for i, (prompt, sp) in enumerate(zip(prompts, per_prompt)):
            spec = _sampling(sp)
            n_total += spec["n"]
            for j in range(spec["n"]):
                seed = spec["seed"]
                # n > 1 with one sampling_seed: derive one seed per sample so the n samples differ.
                row_seed = self._rng.getrandbits(62) if seed is None else (
                    seed if (spec["n"] == 1 and len(prompts) == 1) else protocol.sample_seed(seed, i, j))
                stop = set(spec["stop_token_ids"]) | (set() if spec["ignore_eos"] else set(self.generator.eos_ids))
                rows.append(GenRow(
                    prompt_ids=list(prompt), max_new_tokens=spec["max_new_tokens"], seed=row_seed,
                    temperature=spec["temperature"], top_p=spec["top_p"], top_k=spec["top_k"],
                    stop_ids=frozenset(stop), want_routing=want_routing,
                ))
                prompt_index.append(i)
                no_stop_trim.append(spec["no_stop_trim"])
                sample_ids.append(rid if spec["n"] == 1 and len(prompts) == 1 else f"{rid}-{i}-{j}")
        return _Request(
            rid=rid, rows=rows, prompt_index=prompt_index, sample_ids=sample_ids,
            return_logprob=bool(body.get("return_logprob", False)), no_stop_trim=no_stop_trim,
            want_routing=want_routing, batched=batched_input or n_total > len(prompts),
        )

    def _response(self, req: _Request, results: list[GenResult]) -> Any:
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
                "weight_version": self.weight_version, "num_retractions": 0, "dp_rank": None,
                "e2e_latency": latency,
            }
            if req.return_logprob:
                meta["output_token_logprobs"] = [[lp, tok, None] for lp, tok in zip(logp, tokens)]
            if req.want_routing and result.routed_experts is not None:
                meta["routed_experts"] = protocol.encode_routed_experts(result.routed_experts)
            text = self.tokenizer.decode(tokens, skip_special_tokens=False) if self.tokenizer else ""
            outputs.append({"text": text, "output_ids": tokens, "meta_info": meta})
        return outputs if req.batched else outputs[0]

    # ---------------------------------------------------------------------------- health, info
    async def health(self, request: web.Request) -> web.Response:
        if self.faults.health():
            return web.Response(status=503)
        if self._running or not self._unpaused.is_set():
            return web.Response(status=200)  # busy generating (or paused): alive
        probe = _Request(rid=f"HEALTH_CHECK_{uuid.uuid4().hex}", rows=[GenRow([0], 1, seed=0)], prompt_index=[0],
                         sample_ids=["health"], return_logprob=False, no_stop_trim=[True], want_routing=False,
                         batched=False)
        self._enqueue(probe)
        try:
            await asyncio.wait_for(asyncio.shield(probe.done), HEALTH_TIMEOUT_S)
        except Exception:
            return web.Response(status=503)
        return web.Response(status=200)

    def _model_info(self) -> dict[str, Any]:
        return {
            "model_path": self.generator.model_path, "served_model_name": self.generator.model_path,
            "tokenizer_path": self.generator.model_path, "is_generation": True, "preferred_sampling_params": None,
            "weight_version": self.weight_version, "load_format": "auto", "reasoning_parser": None,
            "tool_call_parser": None, "disaggregation_mode": "null", "has_image_understanding": False,
            "has_audio_understanding": False, **self.generator.model_facts(),
        }

    async def model_info(self, request: web.Request) -> web.Response:
        return web.json_response(self._model_info())

    async def server_info(self, request: web.Request) -> web.Response:
        return web.json_response({
            "model_path": self.generator.model_path, "tp_size": 1, "pp_size": 1, "dp_size": 1, "ep_size": 1,
            "max_running_requests": self.max_running, "weight_version": self.weight_version,
            "disaggregation_mode": "null", "device": str(self.generator.device),
            "internal_states": [{"last_gen_throughput": self._last_throughput,
                                 "effective_max_running_requests_per_dp": self.max_running,
                                 "batches": self.batches, "max_batch_rows": self.max_batch_rows}],
            "version": SERVER_VERSION, "startup_time": self._started,
        })

    async def loads(self, request: web.Request) -> web.Response:
        return web.json_response({
            "timestamp": time.time(), "version": SERVER_VERSION,
            "loads": [{"dp_rank": 0, "num_running_reqs": len(self._running), "num_waiting_reqs": len(self._waiting),
                       "max_running_requests": self.max_running}],
        })

    # -------------------------------------------------------------------------------- control
    async def flush_cache(self, request: web.Request) -> web.Response:
        # We keep no prefix cache; the busy rule is SGLang's, so clients exercise their retry.
        if self._running or self._waiting:
            return web.Response(status=400, text="Cache not flushed: there are running or waiting requests.\n")
        return web.Response(status=200, text=FLUSH_OK)

    async def abort_request(self, request: web.Request) -> web.Response:
        body = await _json_or_empty(request)
        if body.get("abort_all"):
            self._abort(None, "Abort by abort_request")
        elif body.get("rid"):
            self._abort(str(body["rid"]), "Abort by abort_request")
        return web.Response(status=200)

    async def pause_generation(self, request: web.Request) -> web.Response:
        body = await _json_or_empty(request)
        mode = body.get("mode", "abort")
        if mode not in ("abort", "retract", "in_place"):
            return _error_body(f"mode: expected abort, retract or in_place, got {mode!r}")
        self._unpaused.clear()
        if mode == "abort":
            self._abort(None, "Abort by pause_generation")
        # retract / in_place: the running batch finishes; no new batch starts until continue.
        return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def continue_generation(self, request: web.Request) -> web.Response:
        self._unpaused.set()
        return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

    async def set_faults(self, request: web.Request) -> web.Response:
        try:
            self.faults.configure(FaultConfig.from_json(await request.json()))
        except (ValueError, TypeError) as err:
            return _error_body(f"faults: {err}")
        return web.json_response({"success": True, "faults": self.faults.config.to_json()})

    async def get_faults(self, request: web.Request) -> web.Response:
        return web.json_response({"faults": self.faults.config.to_json(), "health_calls": self.faults.health_calls,
                                  "generate_calls": self.faults.generate_calls})

    # ----------------------------------------------------------------------------- weight sync
    async def _apply(self, body: dict[str, Any], load) -> web.Response:
        """Run ``load()`` on the model thread between batches, then set the weight version."""
        if body.get("abort_all_requests"):
            self._abort(None, "Abort by weight update")
        async with self._model_lock:
            try:
                await asyncio.get_running_loop().run_in_executor(self._executor, load)
            except Exception as err:
                return _control(False, f"Failed to update weights: {err}", num_paused_requests=0)
            if body.get("weight_version") is not None:
                self.weight_version = str(body["weight_version"])
        return _control(True, "Succeeded to update model weights.", num_paused_requests=0)

    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        body = await _json_or_empty(request)
        path = body.get("model_path")
        if not path or not Path(path).is_dir():
            return _control(False, f"Failed to get weights iterator: model_path {path!r} is not a directory.",
                            num_paused_requests=0)
        return await self._apply(body, lambda: self.generator.reload(path))

    async def init_weights_update_group(self, request: web.Request) -> web.Response:
        body = await _json_or_empty(request)
        try:
            args = (str(body["master_address"]), int(body["master_port"]), int(body["rank_offset"]),
                    int(body["world_size"]), str(body["group_name"]), str(body.get("backend", "gloo")))
        except (KeyError, TypeError, ValueError) as err:
            return _control(False, f"init_weights_update_group: missing or bad field {err}")
        if args[5] == "nccl" and self.generator.device.type != "cuda":
            args = (*args[:5], "gloo")  # a CPU engine can only join with gloo
        try:
            # Blocks until the trainer joins too, so it runs off the event loop.
            group = await asyncio.get_running_loop().run_in_executor(
                self._comm_executor, lambda: weight_sync.UpdateGroup(*args)
            )
        except Exception as err:
            return _control(False, f"Failed to init weights update group: {err}")
        self._groups[args[4]] = group
        return _control(True, "Succeeded to initialize custom process group.")

    async def destroy_weights_update_group(self, request: web.Request) -> web.Response:
        body = await _json_or_empty(request)
        group = self._groups.pop(str(body.get("group_name")), None)
        if group is None:
            return _control(False, f"no weights update group {body.get('group_name')!r}")
        group.close()
        return _control(True, "Succeeded to destroy custom process group.")

    async def update_weights_from_distributed(self, request: web.Request) -> web.Response:
        body = await _json_or_empty(request)
        group = self._groups.get(str(body.get("group_name")))
        if group is None:
            return _control(False, f"no weights update group {body.get('group_name')!r}")
        try:
            names, dtypes, shapes = body["names"], body["dtypes"], body["shapes"]
            if not len(names) == len(dtypes) == len(shapes):
                raise ValueError("names, dtypes and shapes differ in length")
            device = self.generator.device if group.backend.__class__.__name__.endswith("NCCL") else "cpu"
            tensors = [torch.empty(tuple(s), dtype=weight_sync.dtype_from_name(d), device=device)
                       for d, s in zip(dtypes, shapes)]
        except (KeyError, TypeError, ValueError) as err:
            return _control(False, f"update_weights_from_distributed: {err}")
        # Receive first (the trainer is broadcasting now), then load between batches.
        await asyncio.get_running_loop().run_in_executor(self._comm_executor, group.broadcast, tensors)
        return await self._apply(body, lambda: self.generator.load_named_tensors(list(zip(names, tensors))))

    async def update_weights_from_tensor(self, request: web.Request) -> web.Response:
        body = await _json_or_empty(request)
        if body.get("load_format") not in (None, "direct"):
            return _control(False, f"load_format {body.get('load_format')!r}: only the default (list of "
                                   "(name, tensor)) is supported by the luspo local server")
        entries = body.get("serialized_named_tensors")
        if not isinstance(entries, list) or not entries:
            return _control(False, "serialized_named_tensors: expected a list with one entry per TP rank")
        try:
            named = weight_sync.deserialize_named_tensors(entries[0])  # we are TP rank 0 of 1
        except Exception as err:
            return _control(False, f"serialized_named_tensors: {err}")
        return await self._apply(body, lambda: self.generator.load_named_tensors(named))


class UnknownSamplingKey(Exception):
    """sglang 0.5.23's contract gate: an unknown sampling_params key is HTTP 400."""


def _sampling(sp: Any) -> dict[str, Any]:
    """Validate one ``sampling_params`` object the way sglang does, for the keys we serve."""
    if not isinstance(sp, dict):
        raise BadRequest("sampling_params: expected an object")
    unknown = sorted(set(sp) - protocol.KNOWN_SAMPLING_KEYS)
    if unknown:
        expected = ", ".join(f"`{k}`" for k in sorted(protocol.KNOWN_SAMPLING_KEYS))
        raise UnknownSamplingKey(f"unknown field `{unknown[0]}`, expected one of {expected}")
    for key, neutral in _NEUTRAL.items():
        if key in sp and sp[key] not in neutral:
            raise BadRequest(f"sampling_params.{key}: not supported by the luspo local server")

    def number(key: str, default: Any, kind: type, ok, rule: str) -> Any:
        value = sp.get(key, default)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise BadRequest(f"sampling_params.{key}: expected {rule}, got {value!r}")
        value = kind(value)
        if not ok(value):
            raise BadRequest(f"sampling_params.{key}: expected {rule}, got {value!r}")
        return value

    top_k = number("top_k", -1, int, lambda v: v == -1 or v >= 1, "-1 or ≥ 1")
    seed = sp.get("sampling_seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest(f"sampling_params.sampling_seed: expected an integer, got {seed!r}")
    stop_ids = sp.get("stop_token_ids") or []
    if not (isinstance(stop_ids, list) and all(isinstance(t, int) for t in stop_ids)):
        raise BadRequest(f"sampling_params.stop_token_ids: expected a list of token ids, got {stop_ids!r}")
    return {
        "temperature": number("temperature", 1.0, float, lambda v: v >= 0, "≥ 0"),
        "top_p": number("top_p", 1.0, float, lambda v: 0 < v <= 1, "a float in (0, 1]"),
        "top_k": -1 if top_k >= protocol.TOP_K_ALL else top_k,
        "max_new_tokens": number("max_new_tokens", 128, int, lambda v: v >= 1, "a positive integer"),
        "n": number("n", 1, int, lambda v: v >= 1, "a positive integer"),
        "seed": seed,
        "stop_token_ids": stop_ids,
        "ignore_eos": bool(sp.get("ignore_eos", False)),
        "no_stop_trim": bool(sp.get("no_stop_trim", False)),
    }


async def _json_or_empty(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except json.JSONDecodeError:
        return {}
    return body if isinstance(body, dict) else {}


def serve(
    hf_dir: str, host: str = "127.0.0.1", port: int = 30000, *, device: str = "cpu", dtype: str = "float32",
    max_running_requests: int = 64, seed: int = 0, faults: FaultConfig | None = None,
    weight_version: str = "default",
) -> None:
    """Load the model and serve until interrupted. Prints one ``ready`` line on stdout when listening."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(seed)
    generator = TransformersGenerator(hf_dir, device=device, dtype=dtype)
    tokenizer = None
    if (Path(hf_dir) / "tokenizer.json").is_file() or (Path(hf_dir) / "tokenizer_config.json").is_file():
        tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    server = SGLangAPIServer(generator, max_running_requests=max_running_requests, seed=seed, faults=faults,
                             weight_version=weight_version, tokenizer=tokenizer)

    def ready(*_: Any) -> None:
        print(f"ready http://{host}:{port}", flush=True)

    web.run_app(server.app(), host=host, port=port, print=ready, access_log=None, handle_signals=True,
                shutdown_timeout=1.0)


def build_arg_parser():
    """The flags of ``tools/serve_local.py`` (also ``python -m luspo_megatron.rollout.local.server``)."""

    from luspo_megatron.config import OneLineArgumentParser

    parser = OneLineArgumentParser(prog="serve_local.py", description=__doc__.split("\n")[0])
    parser.add_argument("--hf-dir", required=True, help="Hugging Face model directory to serve.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (one GPU).")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES_CLI))
    parser.add_argument("--max-running-requests", type=int, default=64, help="Rows (samples) per batch.")
    parser.add_argument("--seed", type=int, default=0, help="Seeds requests that carry no sampling_seed.")
    parser.add_argument("--weight-version", default="default")
    faults = parser.add_argument_group("fault injection (tests)")
    faults.add_argument("--fault-health-503-first", type=int, default=0, metavar="K")
    faults.add_argument("--fault-500-every", type=int, default=0, metavar="M")
    faults.add_argument("--fault-drop-every", type=int, default=0, metavar="M")
    faults.add_argument("--fault-abort-every", type=int, default=0, metavar="M")
    faults.add_argument("--fault-slow-s", type=float, default=0.0, metavar="S")
    return parser


DTYPES_CLI = ("float32", "bfloat16", "float16")


def main(argv: list[str] | None = None) -> None:
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    if not Path(args.hf_dir, "config.json").is_file():
        parser.error(f"--hf-dir: expected a Hugging Face model directory with config.json, got {args.hf_dir!r}")
    faults = FaultConfig(
        health_503_first=args.fault_health_503_first, error_500_every=args.fault_500_every,
        drop_every=args.fault_drop_every, abort_every=args.fault_abort_every, slow_s=args.fault_slow_s,
    )
    serve(args.hf_dir, args.host, args.port, device=args.device, dtype=args.dtype,
          max_running_requests=args.max_running_requests, seed=args.seed, faults=faults,
          weight_version=args.weight_version)


if __name__ == "__main__":
    main()
