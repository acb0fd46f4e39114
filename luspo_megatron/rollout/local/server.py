"""Our SGLang-API server: SGLang's native HTTP API in front of a transformers model.

Same request and response JSON as sglang 0.5.23 for everything an RL trainer uses
(its ``http_server.py`` and ``io_struct.py``): ``/generate`` (token ids in and out, ``n``, stop ids,
sampling params, ``sampling_seed``, log-prob triples, ``finish_reason`` objects, ``meta_info`` with
``weight_version``, ``return_routed_experts``), ``/health``, ``/health_generate``, ``/model_info``
(and ``/get_model_info``), ``/server_info`` (and ``/get_server_info``), ``/v1/loads``,
``/flush_cache``, ``/abort_request``, ``/pause_generation``, ``/continue_generation`` and the weight
routes of :mod:`.weight_routes` (``/update_weights_from_{disk,tensor,distributed}``,
``/{init,destroy}_weights_update_group``, ``/get_weights_by_name``).

As a service (docs/reliability.md §1): ``--api-key`` as sglang checks it (:mod:`.auth`); every
body validated with limits before it reaches the model (:mod:`.requests`); a request that fails
fails alone, a disconnected client's rows are cancelled (:mod:`.scheduler`); ``/health_generate``
answers 200 only when the model thread makes progress within ``--health-timeout-s``; weight updates
are all or nothing (:mod:`.weight_files`). The test-only route ``/luspo/faults``
(:mod:`.faults`) exists only with ``--enable-fault-injection``.

Run it with ``python tools/serve_local.py --hf-dir DIR --port PORT``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from aiohttp import web

from luspo_megatron.rollout import protocol
from luspo_megatron.rollout.local import weight_files
from luspo_megatron.rollout.local.auth import API_KEY_ENV, api_key_middleware
from luspo_megatron.rollout.local.faults import FaultConfig, FaultInjector
from luspo_megatron.rollout.local.generation import GenResult, GenRow, TransformersGenerator
from luspo_megatron.rollout.local.requests import (
    BadRequest,
    GenerateRequest,
    Limits,
    UnknownSamplingKey,
    generate_response,
    parse_generate,
    read_json,
)
from luspo_megatron.rollout.local.scheduler import Scheduler
from luspo_megatron.rollout.local.weight_routes import WeightRoutes

log = logging.getLogger(__name__)

SERVER_VERSION = "luspo-local-0.1"
HEALTH_TIMEOUT_S = 20.0  # SGLANG_HEALTH_CHECK_TIMEOUT's default
HEALTH_PREFIX = "HEALTH_CHECK_"
DISCONNECT_POLL_S = 0.1  # how often a waiting /generate looks for its client
FLUSH_OK = ("Cache flushed.\nPlease check backend logs for more details. (When there are running or waiting "
            "requests, the operation will not be performed.)\n")


def error_body(message: str, status: int = 400) -> web.Response:
    """sglang's error body (``ErrorResponse``)."""
    kind = {400: "Bad Request", 413: "Payload Too Large"}.get(status, "InternalServerError")
    return web.json_response({"object": "error", "message": message, "type": kind, "param": None, "code": status},
                             status=status)


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


class SGLangAPIServer:
    """The aiohttp application, its scheduler and its weight routes. Build with :meth:`app`."""

    def __init__(
        self, generator: TransformersGenerator, *, max_running_requests: int = 64, seed: int = 0,
        faults: FaultConfig | None = None, enable_fault_injection: bool = False, weight_version: str = "default",
        tokenizer: Any = None, api_key: str | None = None, host: str = "127.0.0.1", max_n: int = 1024,
        max_body_bytes: int = 64 * 2**20, max_tensor_body_bytes: int = 2**30, context_length: int | None = None,
        health_timeout_s: float = HEALTH_TIMEOUT_S, allowed_weight_dirs: list[str] | None = None,
    ) -> None:
        if faults is not None and faults != FaultConfig() and not enable_fault_injection:
            raise ValueError("faults: fault injection needs enable_fault_injection (tests only)")
        self.generator = generator
        self.enable_fault_injection = enable_fault_injection
        self.faults = FaultInjector(faults if enable_fault_injection else None)
        self.weight_version = weight_version
        self.tokenizer = tokenizer
        self.api_key = api_key or None
        self.host = host
        self.health_timeout_s = health_timeout_s
        self.limits = Limits(vocab_size=generator.vocab_size, context_length=context_length or model_context(generator),
                             max_n=max_n, max_body_bytes=max_body_bytes, max_tensor_body_bytes=max_tensor_body_bytes)
        self.allowed_roots = weight_files.allowed_roots(allowed_weight_dirs)
        self.scheduler = Scheduler(generator.generate, max_running=max_running_requests, faults=self.faults)
        self.weights = WeightRoutes(self)
        self._rng = random.Random(seed)  # seeds of requests without sampling_seed
        self._started = time.time()

    # ------------------------------------------------------------------------------------ app
    def app(self) -> web.Application:
        middlewares = [api_key_middleware(self.api_key)] if self.api_key else []
        app = web.Application(middlewares=middlewares,
                              client_max_size=max(self.limits.max_body_bytes, self.limits.max_tensor_body_bytes))
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
        self.weights.register(r)
        if self.enable_fault_injection:  # otherwise the routes do not exist: 404
            r.add_post("/luspo/faults", self.set_faults)
            r.add_get("/luspo/faults", self.get_faults)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        await self.scheduler.start()

    async def _on_cleanup(self, app: web.Application) -> None:
        await self.scheduler.stop()
        self.weights.close()

    async def _body(self, request: web.Request) -> dict[str, Any]:
        body = await read_json(request, self.limits.max_body_bytes, empty={})
        if not isinstance(body, dict):
            raise BadRequest(f"body: expected a JSON object, got {type(body).__name__}")
        return body

    async def _wait(self, request: web.Request, future: asyncio.Future) -> bool:
        """Wait for ``future``; False as soon as the client has disconnected instead."""
        while True:
            done, _ = await asyncio.wait({future}, timeout=DISCONNECT_POLL_S)
            if done:
                return True
            if _client_gone(request):
                return False

    # ------------------------------------------------------------------------------- /generate
    async def generate(self, request: web.Request) -> web.StreamResponse:
        fault = self.faults.generate() if self.enable_fault_injection else None
        if fault == "exit":  # a hard crash: no answer, no clean-up, like a killed or OOM'd server
            log.error("injected fault: exiting")
            os._exit(3)
        if self.faults.config.slow_s:
            await asyncio.sleep(self.faults.config.slow_s)
        if fault == "error_500":
            return error_body("injected fault: HTTP 500", status=500)
        if fault == "drop":
            request.transport.close()  # the client sees the connection die with no answer
            return web.Response(status=500)
        try:
            body = await read_json(request, self.limits.max_body_bytes)
            req = parse_generate(body, self.limits, draw_seed=lambda: self._rng.getrandbits(62),
                                 eos_ids=self.generator.eos_ids)
        except UnknownSamplingKey as err:
            return web.json_response({"error": str(err)}, status=400)
        except BadRequest as err:
            return error_body(str(err), err.status)
        if fault == "abort":
            for row in req.rows:
                row.abort_message = "injected fault: abort"
            aborted = [GenResult(tokens=[], logp=[], finish=protocol.FINISH_ABORT) for _ in req.rows]
            return web.json_response(generate_response(req, aborted, self.weight_version, self.tokenizer))
        # While paused, new requests wait here (SGLang's is_pause_cond), unless their client leaves.
        unpaused = asyncio.ensure_future(self.scheduler.unpaused.wait())
        if not await self._wait(request, unpaused):
            unpaused.cancel()
            return error_body("client disconnected", status=499)
        self.scheduler.submit(req)
        if not await self._wait(request, req.done):
            log.info("client of %s disconnected: cancelled %d rows", req.rid, self.scheduler.cancel(req))
            await asyncio.wait({req.done}, timeout=DISCONNECT_POLL_S)
            return error_body("client disconnected", status=499)
        if req.done.exception() is not None:
            return error_body(f"generation failed: {req.done.exception()}", status=500)
        return web.json_response(generate_response(req, req.results, self.weight_version, self.tokenizer))

    # ---------------------------------------------------------------------------- health, info
    async def health(self, request: web.Request) -> web.Response:
        """SGLang's check: a 1-token greedy generation on ``input_ids=[0]``; 200 as soon as the
        model thread makes progress (the probe finishes, or any decode step completes), 503 when
        neither happens within ``--health-timeout-s`` (wedged, or paused that long)."""
        if self.faults.health():
            return web.Response(status=503)
        tic = time.monotonic()
        rid = f"{HEALTH_PREFIX}{uuid.uuid4().hex}"
        probe = GenerateRequest(rid=rid, rows=[GenRow([0], 1, seed=0, temperature=0.0, rid=rid)], prompt_index=[0],
                                sample_ids=[rid], return_logprob=False, no_stop_trim=[True], want_routing=False,
                                batched=False)
        self.scheduler.submit(probe)
        healthy = False
        while (left := tic + self.health_timeout_s - time.monotonic()) > 0:
            if probe.done.done():  # aborted (a pause) or failed: only progress of other rows counts now
                await asyncio.sleep(min(0.05, left))
            else:
                await asyncio.wait({probe.done}, timeout=min(0.05, left))
            if probe.done.done() and probe.done.exception() is None and \
                    probe.results[0].finish != protocol.FINISH_ABORT:
                healthy = True
                break
            if self.generator.last_step > tic:
                healthy = True
                break
        if not probe.done.done():
            self.scheduler.abort(rid, "health check answered")
        if not healthy:
            log.error("health check failed: no generation progress within %.1f s", self.health_timeout_s)
        return web.Response(status=200 if healthy else 503)

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
        s, limits = self.scheduler, self.limits
        return web.json_response({
            "model_path": self.generator.model_path, "tp_size": 1, "pp_size": 1, "dp_size": 1, "ep_size": 1,
            "max_running_requests": s.max_running, "weight_version": self.weight_version,
            "context_length": limits.context_length, "max_n": limits.max_n, "max_body_bytes": limits.max_body_bytes,
            "api_key_required": self.api_key is not None, "enable_fault_injection": self.enable_fault_injection,
            "disaggregation_mode": "null", "device": str(self.generator.device),
            "internal_states": [{"last_gen_throughput": s.last_throughput,
                                 "effective_max_running_requests_per_dp": s.max_running,
                                 "batches": s.batches, "max_batch_rows": s.max_batch_rows,
                                 "cancelled_rows": s.cancelled_rows, "isolated_batches": s.isolated_batches,
                                 "failed_requests": s.failed_requests}],
            "version": SERVER_VERSION, "startup_time": self._started,
        })

    async def loads(self, request: web.Request) -> web.Response:
        return web.json_response({
            "timestamp": time.time(), "version": SERVER_VERSION,
            "loads": [{"dp_rank": 0, "num_running_reqs": self.scheduler.running_rows(),
                       "num_waiting_reqs": len(self.scheduler.waiting),
                       "max_running_requests": self.scheduler.max_running}],
        })

    # -------------------------------------------------------------------------------- control
    async def flush_cache(self, request: web.Request) -> web.Response:
        # We keep no prefix cache; the busy rule is SGLang's (health probes aside), so clients exercise their retry.
        busy = [req for req, _ in [*self.scheduler.running, *self.scheduler.waiting]
                if not req.rid.startswith(HEALTH_PREFIX)]
        if busy:
            return web.Response(status=400, text="Cache not flushed: there are running or waiting requests.\n")
        return web.Response(status=200, text=FLUSH_OK)

    async def abort_request(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
        except BadRequest as err:
            return error_body(str(err), err.status)
        if body.get("abort_all") is True:
            self.scheduler.abort(None, "Abort by abort_request")
        elif isinstance(body.get("rid"), str) and body["rid"]:
            self.scheduler.abort(body["rid"], "Abort by abort_request")
        return web.Response(status=200)

    async def pause_generation(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
        except BadRequest as err:
            return error_body(str(err), err.status)
        mode = body.get("mode", "abort")
        if mode not in ("abort", "retract", "in_place"):
            return error_body(f"mode: expected abort, retract or in_place, got {mode!r}"[:300])
        self.scheduler.unpaused.clear()
        if mode == "abort":
            self.scheduler.abort(None, "Abort by pause_generation")
        # retract / in_place: the running batch finishes; no new batch starts until continue.
        return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def continue_generation(self, request: web.Request) -> web.Response:
        self.scheduler.unpaused.set()
        return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

    async def set_faults(self, request: web.Request) -> web.Response:
        try:
            self.faults.configure(FaultConfig.from_json(await self._body(request)))
        except BadRequest as err:
            return error_body(str(err), err.status)
        except (ValueError, TypeError) as err:
            return error_body(f"faults: {err}")
        return web.json_response({"success": True, "faults": self.faults.config.to_json()})

    async def get_faults(self, request: web.Request) -> web.Response:
        return web.json_response({"faults": self.faults.config.to_json(), "health_calls": self.faults.health_calls,
                                  "generate_calls": self.faults.generate_calls})


def model_context(generator: TransformersGenerator) -> int:
    """The served model's context (sglang's default ``--context-length``): max_position_embeddings."""
    return int(getattr(generator.model.config, "max_position_embeddings", None) or 32768)


def serve(hf_dir: str, host: str = "127.0.0.1", port: int = 30000, *, device: str = "cpu", dtype: str = "float32",
          seed: int = 0, **options: Any) -> None:
    """Load the model and serve until interrupted (``options``: :class:`SGLangAPIServer`'s keywords).
    Prints one ``ready`` line on stdout when listening."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(seed)
    generator = TransformersGenerator(hf_dir, device=device, dtype=dtype)
    tokenizer = None
    if (Path(hf_dir) / "tokenizer.json").is_file() or (Path(hf_dir) / "tokenizer_config.json").is_file():
        tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    server = SGLangAPIServer(generator, seed=seed, tokenizer=tokenizer, host=host, **options)

    def ready(*_: Any) -> None:
        print(f"ready http://{host}:{port}", flush=True)

    web.run_app(server.app(), host=host, port=port, print=ready, access_log=None, handle_signals=True,
                shutdown_timeout=1.0)


def main(argv: list[str] | None = None) -> None:
    from luspo_megatron.rollout.local.server_cli import build_arg_parser, options_from_args

    parser = build_arg_parser()
    args = parser.parse_args(argv)
    options = options_from_args(parser, args, os.environ.get(API_KEY_ENV))
    serve(args.hf_dir, args.host, args.port, device=args.device, dtype=args.dtype, seed=args.seed, **options)


if __name__ == "__main__":
    main()
