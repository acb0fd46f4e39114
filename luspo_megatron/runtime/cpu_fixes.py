"""The eleven CPU / gloo redirections themselves (P1-P11), and the call-site tracing they report to.

The table that names, pins and applies them is :mod:`luspo_megatron.runtime.cpu_compat`; read its
docstring first. Each ``_pN_*`` function patches megatron-core 0.16.1 (lines tied to its internals
carry ``# mcore-0.16.1``) and returns False when its trigger does not hold (nothing patched).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import threading
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger("luspo_megatron.runtime.cpu_compat")

TRACE_ENV = "LUSPO_CPU_COMPAT_TRACE"

# ------------------------------------------------------------------------------------------ tracing
_lock = threading.Lock()
_redirected: Counter = Counter()


def _tracing() -> bool:
    return os.environ.get(TRACE_ENV, "") not in ("", "0", "false")


def _megatron_caller() -> str:
    """file:line (relative to megatron/core/) of the innermost megatron frame on the stack."""
    marker = f"{os.sep}megatron{os.sep}core{os.sep}"
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if marker in name:
            return f"{name.rsplit(marker, 1)[1]}:{frame.f_lineno}"
        frame = frame.f_back
    return "<outside megatron>"


def _trace(fix: str) -> None:
    if not _tracing():
        return
    site = (fix, _megatron_caller())
    with _lock:
        _redirected[site] += 1
        first = _redirected[site] == 1
    if first:
        logger.info("cpu_compat %s redirected megatron/core/%s", fix, site[1])


def redirected_call_sites() -> dict[tuple[str, str], int]:
    """(fix, megatron call site) -> how many times it was redirected (recorded while tracing)."""
    with _lock:
        return dict(_redirected)


# ------------------------------------------------------------------------------------------- fixes
def _module(name: str):
    return importlib.import_module(name)


def _is_cuda_device(device) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):  # a bare index means a CUDA ordinal
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


_CPU = torch.device("cpu")


def _p1_current_device() -> bool:
    def current_device() -> torch.device:
        _trace("P1")
        return _CPU

    torch.cuda.current_device = current_device
    return True


def _p2_rng_tracker() -> bool:
    random = _module("megatron.core.tensor_parallel.random")

    def get_state(device="cuda", clone=False, graph_safe=False):  # mcore-0.16.1 signature
        _trace("P2")
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):  # mcore-0.16.1 signature
        _trace("P2")
        torch.set_rng_state(new_state)

    def add(self, name, seed):
        """CudaRNGStatesTracker.add on the CPU generator: seed it, snapshot, restore."""
        _trace("P2")
        self._is_initialized = True  # mcore-0.16.1 tracker fields
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        previous = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(previous)

    random._get_cuda_rng_state = get_state  # mcore-0.16.1
    random._set_cuda_rng_state = set_state  # mcore-0.16.1
    random.CudaRNGStatesTracker.add = add
    return True


class _CpuPlacementMode(TorchFunctionMode):
    """P3: every torch call sees CPU placements. CUDA ``device=`` arguments become CPU,
    ``Tensor.cuda()`` / ``.to("cuda")`` are no-ops, ``pin_memory=True`` is dropped, and the
    argument-less ``Tensor.type()`` of a CPU tensor reports ``torch.cuda.<X>Tensor``, because
    megatron's optimizer and grad clipping compare against those strings."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            _trace("P3")
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            if not args[0].is_cuda and name.startswith("torch.") and not name.startswith("torch.cuda."):
                _trace("P3")
                return "torch.cuda." + name[len("torch."):]
            return name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            _trace("P3")
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):
            _trace("P3")
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            _trace("P3")
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


_placement_mode: _CpuPlacementMode | None = None


def _p3_placements() -> bool:
    global _placement_mode
    # A TorchFunctionMode entered and never exited stays on this thread's mode stack: the public
    # way to make it global for the training thread (autograd propagates it to backward).
    _placement_mode = _CpuPlacementMode()
    _placement_mode.__enter__()
    return True


class _NullEvent:
    """Stands in for ``torch.cuda.Event``: always complete, zero elapsed time. A class, not a
    factory, so annotations such as ``torch.cuda.Event | None`` keep working."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        return None

    def wait(self, stream=None):
        return None

    def synchronize(self):
        return None

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event) -> float:
        return 0.0


class _NullStream:
    """Stands in for ``torch.cuda.Stream``: every method is a no-op (CPU work is synchronous)."""

    def __init__(self, *args, **kwargs):
        _trace("P4")

    def wait_stream(self, stream):
        _trace("P4")

    def wait_event(self, event):
        _trace("P4")

    def record_event(self, event=None):
        return event or _NullEvent()

    def synchronize(self):
        return None

    def query(self) -> bool:
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_DEFAULT_STREAM = _NullStream()


def _p4_streams() -> bool:
    def synchronize(device=None):
        _trace("P4")

    def current_stream(device=None):
        _trace("P4")
        return _DEFAULT_STREAM

    def stream(s=None):
        _trace("P4")
        return contextlib.nullcontext(s)

    torch.cuda.synchronize = synchronize
    torch.cuda.current_stream = current_stream
    torch.cuda.default_stream = current_stream
    torch.cuda.Stream = _NullStream
    torch.cuda.Event = _NullEvent
    torch.cuda.stream = stream
    torch.cuda.nvtx.range_push = lambda *a, **k: None
    torch.cuda.nvtx.range_pop = lambda *a, **k: None
    return True


def _p5_te_general_gemm() -> bool:
    moe_utils = _module("megatron.core.transformer.moe.moe_utils")
    if hasattr(moe_utils, "te_general_gemm"):
        return False  # TE imported (or upstream fixed the fallback)
    moe_utils.te_general_gemm = None  # mcore-0.16.1: name defined only inside the TE try block
    return True


def _p6_sequence_parallel_norm() -> bool:
    torch_norm = _module("megatron.core.transformer.torch_norm")
    cls = torch_norm.WrappedTorchNorm
    original = cls.__new__

    def new(klass, config, hidden_size, *args, **kwargs):
        if not config.sequence_parallel:
            return original(klass, config, hidden_size, *args, **kwargs)
        _trace("P6")
        # The assert guards fused kernels; torch's RMSNorm is per-token and SP-safe. Tagging the
        # params makes finalize_model_grads sum their grads over TP, as Apex's FusedLayerNorm does:
        # under SP each rank's norm sees only its own tokens.
        config.sequence_parallel = False
        try:
            norm = original(klass, config, hidden_size, *args, **kwargs)
        finally:
            config.sequence_parallel = True
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    cls.__new__ = staticmethod(new)
    return True


def _p7_split_sizes() -> bool:
    moe_utils = _module("megatron.core.transformer.moe.moe_utils")
    dispatcher = _module("megatron.core.transformer.moe.token_dispatcher")
    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            _trace("P7")
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu  # mcore-0.16.1: imported by name
    return True


def _p8_uneven_collectives() -> bool:
    mappings = _module("megatron.core.tensor_parallel.mappings")
    gather_original = mappings._gather_along_first_dim  # mcore-0.16.1 private helpers, no public twin
    scatter_original = mappings._reduce_scatter_along_first_dim

    def _padded(chunk: torch.Tensor, rows: int) -> torch.Tensor:
        pad = chunk.new_zeros((rows - chunk.shape[0], *chunk.shape[1:]))
        return torch.cat([chunk, pad]) if pad.shape[0] else chunk

    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather_original(input_, group, output_split_sizes, use_global_buffer)
        _trace("P8")
        sizes = [int(s) for s in output_split_sizes]
        rows = max(sizes)
        out = input_.new_empty((rows * group.size(), *input_.shape[1:]))
        torch.distributed.all_gather_into_tensor(out, _padded(input_.contiguous(), rows), group=group)
        return torch.cat([piece[:n] for piece, n in zip(out.split(rows), sizes)])

    def reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return scatter_original(input_, group, input_split_sizes, use_global_buffer)
        _trace("P8")
        sizes = [int(s) for s in input_split_sizes]
        rows = max(sizes)
        padded = torch.cat([_padded(piece, rows) for piece in input_.contiguous().split(sizes)])
        out = input_.new_empty((rows, *input_.shape[1:]))
        torch.distributed.reduce_scatter_tensor(out, padded, group=group)
        return out[: sizes[group.rank()]]

    mappings._gather_along_first_dim = gather
    mappings._reduce_scatter_along_first_dim = reduce_scatter
    return True


def _p11_shape_exchange() -> bool:
    p2p = _module("megatron.core.pipeline_parallel.p2p_communication")
    cls = p2p.P2PCommunicator
    original = cls._communicate_shapes

    def communicate_shapes(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next):
        if self.config.use_ring_exchange_p2p:
            return original(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next)
        _trace("P11")
        # Same messages as upstream, sent with megatron's own _p2p_ops, whose per-parity ordering
        # (and second group when pp = 2) keeps the two directions apart. Upstream batches them
        # with batch_isend_irecv: with pp = 2 the previous and next stage are one peer, so the
        # forward and backward shapes (same size, same tag) swap silently on gloo.
        def shape(tensor):
            return None if tensor is None else torch.tensor(tensor.size(), dtype=torch.int64)

        recv_prev_shape = torch.empty(3, dtype=torch.int64) if recv_prev else None
        recv_next_shape = torch.empty(3, dtype=torch.int64) if recv_next else None
        reqs = p2p._p2p_ops(  # mcore-0.16.1 private helper: the pipeline's own non-batched p2p
            tensor_send_prev=shape(tensor_send_prev), tensor_recv_prev=recv_prev_shape,
            tensor_send_next=shape(tensor_send_next), tensor_recv_next=recv_next_shape,
            group=self.pp_group, prev_pipeline_rank=self.prev_rank, next_pipeline_rank=self.next_rank,
        )
        for req in reqs.values():
            req.wait()
        return (recv_prev_shape.tolist() if recv_prev else [0, 0, 0],
                recv_next_shape.tolist() if recv_next else [0, 0, 0])

    cls._communicate_shapes = communicate_shapes
    return True


def _without_apex_or_te() -> bool:
    return not _module("megatron.core.optimizer.distrib_optimizer").HAVE_APEX_OR_TE  # mcore-0.16.1


def _p9_shared_adam_step() -> bool:
    if not _without_apex_or_te():
        return False
    cls = _module("megatron.core.optimizer.distrib_optimizer").DistributedOptimizer
    original = cls.load_state_dict

    def load_state_dict(self, state_dict):
        result = original(self, state_dict)
        # torch Adam increments ``step`` in place once per parameter: one tensor shared by all
        # params would advance len(params) times per step and corrupt the bias correction.
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                _trace("P9")
                state["step"] = state["step"].detach().clone()
        return result

    cls.load_state_dict = load_state_dict
    return True


def _p10_missing_step_key() -> bool:
    if not _without_apex_or_te():
        return False
    cls = _module("megatron.core.optimizer.distrib_optimizer").DistributedOptimizer
    original = cls._set_main_param_and_optimizer_states  # mcore-0.16.1 private method

    def set_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]  # mcore-0.16.1
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        destinations = {"param": main_param, **self.optimizer.state[main_param]}
        with torch.no_grad():
            for key, dst in destinations.items():
                if key == "step" and key not in tensors:  # torch Adam's step lives elsewhere
                    _trace("P10")
                    continue
                dst.copy_(tensors[key])

    cls._set_main_param_and_optimizer_states = set_states
    return True
