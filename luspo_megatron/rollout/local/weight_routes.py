"""The weight routes of our SGLang-API server: updates (disk, tensor, distributed) and read-back.

Same request and response JSON as sglang 0.5.23 (its ``http_server.py`` and ``io_struct.py``):
``{"success", "message"}`` with HTTP 200, or HTTP 400 and the old weights and weight version kept.

What is all or nothing (docs/reliability.md §1):

- ``/update_weights_from_disk``: the whole model. The directory is read and checked completely
  (:mod:`.weight_files`) before the model lock is taken; the copy then cannot fail half-way.
- ``/update_weights_from_tensor`` and ``/update_weights_from_distributed``: each call (one bucket).
  sglang applies a sequence of buckets one by one, and so do we: every name, shape and dtype of a
  bucket is checked before any of its tensors is copied, so a refused bucket changes nothing, but
  the buckets before it stay applied (as in sglang). A trainer keeps generation paused over the
  whole sequence (our client does) and stops when a bucket is refused.
- A distributed bucket whose metadata is wrong is still received (into scratch tensors) when its
  size is at most the model's, so the broadcast group stays in step; a larger one is refused
  without receiving, and the group must then be destroyed and made again.
- ``/init_weights_update_group`` joins the trainer's group with gloo sockets bound to the host the
  server binds (``--host``), not every interface.

``/get_weights_by_name`` (``{"name", "truncate_size": 100}``) answers what sglang's model runners
answer: ``parameter.float().tolist()[:truncate_size]``, a JSON list of the first ``truncate_size``
slices along dimension 0 (rows of a matrix, values of a vector), under the parameter's Hugging Face
checkpoint name (one expert's ``gate_proj`` / ``up_proj`` / ``down_proj``, a tied ``lm_head``).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from aiohttp import web

from luspo_megatron.errors import RolloutError
from luspo_megatron.rollout import weight_sync
from luspo_megatron.rollout.local import weight_files
from luspo_megatron.rollout.local.requests import BadRequest, read_json

log = logging.getLogger(__name__)
_ANY_HOST = ("", "0.0.0.0", "::")


def control(success: bool, message: str, **extra: Any) -> web.Response:
    """sglang's control answer: ``{"success", "message", ...}``, HTTP 200 or 400."""
    return web.json_response({"success": success, "message": message, **extra}, status=200 if success else 400)


class WeightRoutes:
    """The weight routes of one :class:`~.server.SGLangAPIServer` (its generator, scheduler, version)."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.generator = server.generator
        self.groups: dict[str, weight_sync.UpdateGroup] = {}
        self.io = ThreadPoolExecutor(2, thread_name_prefix="weight-io")  # reads and broadcasts off the model thread
        params = {id(p): p for p in self.generator.model.parameters()}.values()
        self.model_bytes = sum(p.numel() * p.element_size() for p in params)

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_post("/update_weights_from_disk", self.update_weights_from_disk)
        router.add_post("/init_weights_update_group", self.init_weights_update_group)
        router.add_post("/destroy_weights_update_group", self.destroy_weights_update_group)
        router.add_post("/update_weights_from_distributed", self.update_weights_from_distributed)
        router.add_post("/update_weights_from_tensor", self.update_weights_from_tensor)
        router.add_route("GET", "/get_weights_by_name", self.get_weights_by_name)
        router.add_route("POST", "/get_weights_by_name", self.get_weights_by_name)

    def close(self) -> None:
        self.io.shutdown(wait=False, cancel_futures=True)

    async def _body(self, request: web.Request, tensors: bool = False) -> dict[str, Any]:
        limits = self.server.limits
        body = await (read_json(request, limits.max_tensor_body_bytes, empty={}, flag="--max-tensor-body-bytes")
                      if tensors else read_json(request, limits.max_body_bytes, empty={}))
        if not isinstance(body, dict):
            raise BadRequest(f"body: expected a JSON object, got {type(body).__name__}")
        version = body.get("weight_version")
        if version is not None and not (isinstance(version, (str, int)) and not isinstance(version, bool)
                                        and len(str(version)) <= 256):
            raise BadRequest(f"weight_version: expected a string of at most 256 characters, got {version!r}"[:300])
        return body

    async def _apply(self, body: dict[str, Any], load) -> web.Response:
        """Run ``load()`` on the model thread between batches, then set the weight version."""
        scheduler = self.server.scheduler
        if body.get("abort_all_requests") is True:
            scheduler.abort(None, "Abort by weight update")
        async with scheduler.model_lock:
            try:
                await asyncio.get_running_loop().run_in_executor(scheduler.executor, load)
            except (ValueError, RolloutError) as err:
                return control(False, f"Failed to update weights: {err}", num_paused_requests=0)
            except Exception as err:  # a bug: say so, keep serving
                log.exception("weight update failed")
                return control(False, f"Failed to update weights: {type(err).__name__}: {err}", num_paused_requests=0)
            if body.get("weight_version") is not None:
                self.server.weight_version = str(body["weight_version"])
        return control(True, "Succeeded to update model weights.", num_paused_requests=0)

    # ------------------------------------------------------------------------------------- disk
    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
            path = body.get("model_path")
            named = await asyncio.get_running_loop().run_in_executor(
                self.io, weight_files.read_checkpoint, path, self.generator.layout, self.server.allowed_roots)
        except BadRequest as err:
            return control(False, str(err), num_paused_requests=0)
        except weight_files.WeightUpdateRefused as err:
            return control(False, str(err), num_paused_requests=0)

        def load() -> None:
            self.generator.load_full_state(named)
            self.generator.model_path = str(path)

        return await self._apply(body, load)

    # ----------------------------------------------------------------------------------- tensor
    async def update_weights_from_tensor(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request, tensors=True)
        except BadRequest as err:
            return control(False, str(err))
        if body.get("load_format") not in (None, "direct"):
            return control(False, f"load_format {body.get('load_format')!r}: only the default (list of "
                                  "(name, tensor)) is supported by the luspo local server")
        entries = body.get("serialized_named_tensors")
        if not isinstance(entries, list) or not entries or not isinstance(entries[0], str):
            return control(False, "serialized_named_tensors: expected a list with one base64 string per TP rank")
        try:
            named = weight_sync.deserialize_named_tensors(entries[0])  # we are TP rank 0 of 1
        except Exception as err:
            return control(False, f"serialized_named_tensors: {err}")
        return await self._apply(body, lambda: self.generator.load_named_tensors(named))

    # ------------------------------------------------------------------------------ distributed
    async def init_weights_update_group(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
            args = _group_args(body)
        except BadRequest as err:
            return control(False, f"init_weights_update_group: {err}")
        if args["group_name"] in self.groups:
            return control(False, f"init_weights_update_group: group {args['group_name']!r} exists; destroy it first")
        if args["backend"] == "nccl" and self.generator.device.type != "cuda":
            args["backend"] = "gloo"  # a CPU engine can only join with gloo
        host = self.server.host
        try:
            # Blocks until the trainer joins too, so it runs off the event loop.
            group = await asyncio.get_running_loop().run_in_executor(self.io, lambda: weight_sync.UpdateGroup(
                args["master_address"], args["master_port"], args["rank_offset"], args["world_size"],
                args["group_name"], args["backend"], bind_host=None if host in _ANY_HOST else host))
        except Exception as err:
            return control(False, f"Failed to init weights update group: {err}")
        self.groups[args["group_name"]] = group
        return control(True, "Succeeded to initialize custom process group.")

    async def destroy_weights_update_group(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
        except BadRequest as err:
            return control(False, str(err))
        group = self.groups.pop(str(body.get("group_name")), None)
        if group is None:
            return control(False, f"no weights update group {body.get('group_name')!r}")
        group.close()
        return control(True, "Succeeded to destroy custom process group.")

    async def update_weights_from_distributed(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
            group = self.groups.get(str(body.get("group_name")))
            if group is None:
                raise BadRequest(f"no weights update group {body.get('group_name')!r}")
            names, dtypes, shapes = _bucket_meta(body)
        except BadRequest as err:
            return control(False, f"update_weights_from_distributed: {err}")
        try:
            self.generator.check_named_shapes(names, shapes, dtypes)
            problem = None
        except ValueError as err:
            problem = str(err)
        nbytes = sum(_numel(s) * torch.empty((), dtype=d).element_size() for s, d in zip(shapes, dtypes))
        if problem is not None and nbytes > self.model_bytes:
            return control(False, f"update_weights_from_distributed: {problem}; the bucket ({nbytes} bytes) was not "
                                  "received, so the group is out of step: destroy and re-initialise it")
        device = self.generator.device if isinstance(group.backend, getattr(torch.distributed, "ProcessGroupNCCL",
                                                                             ())) else "cpu"
        tensors = [torch.empty(tuple(s), dtype=d, device=device) for d, s in zip(dtypes, shapes)]
        # Receive first (the trainer is broadcasting now), then load between batches.
        await asyncio.get_running_loop().run_in_executor(self.io, group.broadcast, tensors)
        if problem is not None:
            return control(False, f"update_weights_from_distributed: {problem} (received and discarded; "
                                  "nothing changed)")
        return await self._apply(body, lambda: self.generator.load_named_tensors(list(zip(names, tensors))))

    # ---------------------------------------------------------------------------------- read back
    async def get_weights_by_name(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
            name, size = body.get("name"), body.get("truncate_size", 100)
            if not isinstance(name, str) or not name:
                raise BadRequest(f"name: expected a parameter name, got {name!r}"[:300])
            if type(size) is not int or size < 0:
                raise BadRequest(f"truncate_size: expected an integer ≥ 0, got {size!r}"[:300])
            values = await asyncio.get_running_loop().run_in_executor(
                self.server.scheduler.executor,  # the model thread: never torn by an update
                lambda: self.generator.parameter(name).detach()[:size].float().cpu().tolist())
        except (BadRequest, ValueError) as err:
            return web.json_response({"error": {"message": str(err)}}, status=400)
        return web.json_response(values)


def _group_args(body: dict[str, Any]) -> dict[str, Any]:
    def field(key: str, kind: type, ok=lambda v: True, rule: str = "") -> Any:
        value = body.get(key)
        if type(value) is not kind or not ok(value):
            raise BadRequest(f"{key}: expected {rule or kind.__name__}, got {value!r}"[:300])
        return value

    args = {
        "master_address": field("master_address", str, bool, "a host name or address"),
        "master_port": field("master_port", int, lambda v: 0 < v < 65536, "a port in [1, 65535]"),
        "rank_offset": field("rank_offset", int, lambda v: v >= 1, "an integer ≥ 1 (rank 0 is the trainer)"),
        "world_size": field("world_size", int, lambda v: 2 <= v <= 65536, "an integer in [2, 65536]"),
        "group_name": field("group_name", str, bool, "a non-empty string"),
        "backend": body.get("backend") or "gloo",
    }
    if args["rank_offset"] >= args["world_size"]:
        raise BadRequest(f"rank_offset {args['rank_offset']} is not below world_size {args['world_size']}")
    if args["backend"] not in ("gloo", "nccl"):
        raise BadRequest(f"backend: expected gloo or nccl, got {args['backend']!r}"[:300])
    return args


def _bucket_meta(body: dict[str, Any]) -> tuple[list[str], list[torch.dtype], list[tuple[int, ...]]]:
    names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
    if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)):
        raise BadRequest("names, dtypes and shapes: expected three lists")
    if not len(names) == len(dtypes) == len(shapes) or not names:
        raise BadRequest(f"names, dtypes and shapes: expected non-empty lists of one length, got "
                         f"{len(names)}, {len(dtypes)} and {len(shapes)}")
    out_dtypes = []
    for i, (name, dtype, shape) in enumerate(zip(names, dtypes, shapes)):
        if not isinstance(name, str):
            raise BadRequest(f"names[{i}]: expected a string, got {name!r}"[:300])
        try:
            out_dtypes.append(weight_sync.dtype_from_name(dtype if isinstance(dtype, str) else repr(dtype)))
        except ValueError as err:
            raise BadRequest(f"dtypes[{i}]: {err}") from None
        if not (isinstance(shape, list) and len(shape) <= 8 and all(type(d) is int and 0 <= d < 2**40 for d in shape)):
            raise BadRequest(f"shapes[{i}]: expected a list of dimensions, got {shape!r}"[:300])
    return names, out_dtypes, [tuple(s) for s in shapes]


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out
