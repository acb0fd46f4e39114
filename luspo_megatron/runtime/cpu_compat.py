"""Run megatron-core on a CPU-only torch with gloo: eleven targeted, documented redirections.

megatron-core assumes CUDA in a few hundred places. Measured on megatron-core 0.16.1 / torch 2.13
CPU, ten fixes are needed for fixed-length batches, each
shown necessary by disabling it alone; packed variable-length micro-batches add P11. Every fix
names the megatron call sites it serves (file:line in 0.16.1) and pins the source fragment it
relies on, so ``tests/runtime/test_cpu_compat.py`` fails loudly when an upgrade moves a call site
instead of letting a patch silently stop applying.

    P1  torch.cuda.current_device() -> CPU device          CPU adaptation (~175 call sites)
    P2  model-parallel RNG tracker on the CPU generator     CPU adaptation
    P3  "cuda" placements, .cuda(), pin_memory, .type()     CPU adaptation (TorchFunctionMode)
    P4  CUDA streams / events / synchronize / nvtx no-ops   CPU adaptation
    P5  moe_utils.te_general_gemm undefined without TE      upstream bug
    P6  torch RMSNorm refuses sequence parallelism          local-spec (no Apex/TE) adaptation
    P7  alltoall split sizes stay tensors on CPU            CPU adaptation
    P8  uneven all-gather / reduce-scatter on gloo          gloo limitation
    P9  one shared Adam ``step`` after distopt load         upstream bug, silent (torch Adam)
    P10 KeyError 'step' loading a fully_reshardable distopt upstream bug (torch Adam)
    P11 pipeline shape exchange swaps directions at pp = 2  gloo; found here, not in the reference:
        packed (THD) micro-batches vary in length, so the schedules exchange shapes
        (``variable_seq_lengths``), and that exchange always uses batch_isend_irecv

When they apply: P1-P4, P7, P8, P11 only when CUDA is absent. P5, P6, P9 and P10 are not about CUDA:
they apply wherever their trigger holds (Transformer Engine / Apex absent, or the local spec's
torch norm in use), because a GPU box without TE hits the same bugs. Everything is idempotent.

Switches (environment):
    LUSPO_CPU_COMPAT_TRACE=1          log every redirected megatron call site once (file:line)
    LUSPO_CPU_COMPAT_DISABLE=P5,P9    skip these fixes (to re-verify the table after an upgrade)

Lines tied to megatron-core 0.16.1 internals carry ``# mcore-0.16.1``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from luspo_megatron.runtime.cpu_fixes import (
    TRACE_ENV,
    _p1_current_device,
    _p2_rng_tracker,
    _p3_placements,
    _p4_streams,
    _p5_te_general_gemm,
    _p6_sequence_parallel_norm,
    _p7_split_sizes,
    _p8_uneven_collectives,
    _p9_shared_adam_step,
    _p10_missing_step_key,
    _p11_shape_exchange,
    redirected_call_sites,
)

__all__ = ["CHECKED_MEGATRON_VERSION", "DISABLE_ENV", "FIXES", "TRACE_ENV", "Fix", "PinnedSite", "apply",
           "pinned_source", "redirected_call_sites", "resolve", "status"]

CHECKED_MEGATRON_VERSION = "0.16.1"  # mcore-0.16.1: every pinned site below was read in this release
DISABLE_ENV = "LUSPO_CPU_COMPAT_DISABLE"


@dataclass(frozen=True)
class PinnedSite:
    """Source text a fix relies on: ``fragment`` must occur in ``module``'s ``attr`` (dotted,
    e.g. ``Class.method``; empty for the whole module)."""

    module: str
    attr: str
    fragment: str


@dataclass(frozen=True)
class Fix:
    name: str
    summary: str
    kind: str  # "cpu" (CUDA absent), "bug" (upstream bug, trigger-gated), "local-spec"
    call_sites: tuple[str, ...]  # file:line in megatron/core of the checked version
    pinned: tuple[PinnedSite, ...]
    apply: Callable[[], bool]  # returns False when the trigger does not hold (nothing patched)


# ----------------------------------------------------------------------------------------- the table
_lock = threading.Lock()
_applied: dict[str, str] = {}  # fix name -> what apply() did

_MC = "megatron.core."
FIXES: dict[str, Fix] = {
    fix.name: fix
    for fix in (
        Fix(
            "P1", "torch.cuda.current_device() returns the CPU device", "cpu",
            ("models/common/embeddings/rotary_pos_embedding.py:162", "tensor_parallel/layers.py", "distributed/"),
            (PinnedSite(_MC + "models.common.embeddings.rotary_pos_embedding", "RotaryEmbedding.get_emb",
                        "device=torch.cuda.current_device()"),),
            _p1_current_device,
        ),
        Fix(
            "P2", "model-parallel RNG tracker uses the CPU generator", "cpu",
            ("tensor_parallel/random.py:41", "tensor_parallel/random.py:72", "tensor_parallel/random.py:217"),
            (PinnedSite(_MC + "tensor_parallel.random", "CudaRNGStatesTracker.add", "torch.cuda.get_rng_state()"),
             PinnedSite(_MC + "tensor_parallel.random", "CudaRNGStatesTracker.fork", "_get_cuda_rng_state("),
             PinnedSite(_MC + "tensor_parallel.random", "CudaRNGStatesTracker.fork", "_set_cuda_rng_state(")),
            _p2_rng_tracker,
        ),
        Fix(
            "P3", "CUDA placements, .cuda(), pin_memory and .type() strings on CPU tensors", "cpu",
            ("transformer/utils.py:35", "pipeline_parallel/schedules.py:596/983/2138",
             "optimizer/optimizer.py:481/485/907", "optimizer/clip_grads.py:103/167/174", "utils.py:1207",
             "optimizer/distrib_optimizer.py:361/420/582/1089"),
            (PinnedSite(_MC + "transformer.utils", "get_default_causal_mask", 'device="cuda"'),
             PinnedSite(_MC + "pipeline_parallel.schedules", "forward_backward_no_pipelining", 'device="cuda"'),
             PinnedSite(_MC + "optimizer.clip_grads", "clip_grad_by_total_norm_fp32",
                        "param.grad.type() == 'torch.cuda.FloatTensor'"),
             PinnedSite(_MC + "optimizer.distrib_optimizer", "DistributedOptimizer._build_model_and_main_param_groups",
                        "model_param.type() == 'torch.cuda.FloatTensor'")),
            _p3_placements,
        ),
        Fix(
            "P4", "CUDA streams, events, synchronize and nvtx are no-ops", "cpu",
            ("transformer/moe/token_dispatcher.py:445", "pipeline_parallel/p2p_communication.py:398",
             "dist_checkpointing/strategies/filesystem_async.py:230", "utils.py:2186/2215"),
            (PinnedSite(_MC + "transformer.moe.token_dispatcher", "MoEAlltoAllTokenDispatcher.__init__",
                        "torch.cuda.Stream()"),
             PinnedSite(_MC + "utils", "nvtx_range_push", "torch.cuda.nvtx.range_push(")),
            _p4_streams,
        ),
        Fix(
            "P11", "pipeline shape exchange (variable_seq_lengths) without batch_isend_irecv", "cpu",
            ("pipeline_parallel/p2p_communication.py:213-238",),
            (PinnedSite(_MC + "pipeline_parallel.p2p_communication", "P2PCommunicator._communicate_shapes",
                        "torch.distributed.batch_isend_irecv(ops)"),
             PinnedSite(_MC + "pipeline_parallel.p2p_communication", "_p2p_ops", "even_recv_odd_send_group")),
            _p11_shape_exchange,
        ),
        Fix(
            "P5", "define moe_utils.te_general_gemm = None without Transformer Engine", "bug",
            ("transformer/moe/moe_utils.py:34", "transformer/moe/moe_utils.py:1192"),
            (PinnedSite(_MC + "transformer.moe.moe_utils", "RouterGatingLinearFunction.forward",
                        "if te_general_gemm is not None"),),
            _p5_te_general_gemm,
        ),
        Fix(
            "P6", "torch RMSNorm under sequence parallelism, params tagged for the TP grad all-reduce", "local-spec",
            ("transformer/torch_norm.py:32", "distributed/finalize_model_grads.py:354"),
            (PinnedSite(_MC + "transformer.torch_norm", "WrappedTorchNorm.__new__",
                        "assert not config.sequence_parallel"),
             PinnedSite(_MC + "distributed.finalize_model_grads", "_allreduce_non_tensor_model_parallel_grads",
                        'getattr(param, "sequence_parallel", False)')),
            _p6_sequence_parallel_norm,
        ),
        Fix(
            "P7", "alltoall split sizes become numpy arrays on CPU", "cpu",
            ("transformer/moe/moe_utils.py:1078", "transformer/moe/token_dispatcher.py:876/879"),
            (PinnedSite(_MC + "transformer.moe.moe_utils", "maybe_move_tensor_to_cpu", "tensor.is_cuda"),
             PinnedSite(_MC + "transformer.moe.token_dispatcher", "", "maybe_move_tensor_to_cpu,")),
            _p7_split_sizes,
        ),
        Fix(
            "P8", "uneven gather / reduce-scatter padded to equal sizes for gloo", "cpu",
            ("tensor_parallel/mappings.py:114", "tensor_parallel/mappings.py:155"),
            (PinnedSite(_MC + "tensor_parallel.mappings", "_gather_along_first_dim",
                        "torch.distributed.all_gather(output_tensor_list, input_, group=group)"),
             PinnedSite(_MC + "tensor_parallel.mappings", "_reduce_scatter_along_first_dim", "input_split_sizes")),
            _p8_uneven_collectives,
        ),
        Fix(
            "P9", "per-parameter Adam step after DistributedOptimizer.load_state_dict", "bug",
            ("optimizer/distrib_optimizer.py:825",),
            (PinnedSite(_MC + "optimizer.distrib_optimizer", "DistributedOptimizer.load_state_dict",
                        's["step"] = step'),),
            _p9_shared_adam_step,
        ),
        Fix(
            "P10", "skip torch Adam's 'step' when setting fully_reshardable optimizer states", "bug",
            ("optimizer/distrib_optimizer.py:940",),
            (PinnedSite(_MC + "optimizer.distrib_optimizer",
                        "DistributedOptimizer._set_main_param_and_optimizer_states",
                        "dst_tensors[key].copy_(tensors[key])"),),
            _p10_missing_step_key,
        ),
    )
}


def disabled_fixes() -> set[str]:
    """Fix names listed in LUSPO_CPU_COMPAT_DISABLE (comma separated)."""
    names = {n.strip().upper() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
    unknown = names - set(FIXES)
    if unknown:
        from luspo_megatron.errors import ConfigError

        raise ConfigError(f"{DISABLE_ENV}: expected fix names among {sorted(FIXES)}, got {sorted(unknown)}")
    return names


def apply(cuda_available: bool | None = None) -> dict[str, str]:
    """Apply every fix whose trigger holds; idempotent. Returns fix name -> status, one of
    "applied", "not needed" (trigger absent, e.g. CUDA present) or "disabled"."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    disabled = disabled_fixes()
    with _lock:
        for name, fix in FIXES.items():
            if name in _applied:
                continue
            if name in disabled:
                _applied[name] = "disabled"
            elif fix.kind == "cpu" and cuda_available:
                _applied[name] = "not needed"
            else:
                _applied[name] = "applied" if fix.apply() else "not needed"
        return dict(_applied)


def status() -> dict[str, str]:
    """What ``apply`` did so far (empty before it ran)."""
    with _lock:
        return dict(_applied)


def resolve(site: PinnedSite):
    """The object a pinned site names (module or attribute)."""
    obj = importlib.import_module(site.module)
    for part in filter(None, site.attr.split(".")):
        obj = getattr(obj, part)
    return obj


def pinned_source(site: PinnedSite) -> str:
    """The megatron source text a pinned site names. Read from the original function even after
    patching: patched attributes keep the upstream source available through the module file."""
    module = importlib.import_module(site.module)
    if not site.attr:
        return inspect.getsource(module)
    source = inspect.getsource(module)
    # Find the definition textually, so a fix that replaced the attribute still checks upstream.
    *owners, leaf = site.attr.split(".")
    for owner in owners:
        start = source.find(f"class {owner}")
        if start < 0:
            raise LookupError(f"{site.module}: class {owner} not found")
        source = source[start:]
    start = source.find(f"def {leaf}(")
    if start < 0:
        raise LookupError(f"{site.module}: def {site.attr} not found")
    body = source[start:]
    # The definition ends at the next definition at the same or lower indentation.
    indent = len(source[: start].rsplit("\n", 1)[-1])
    lines = body.split("\n")
    end = len(lines)
    for i, line in enumerate(lines[1:], 1):
        stripped = line.lstrip()
        if stripped and len(line) - len(stripped) <= indent and not stripped.startswith((")", "]", "#")):
            end = i
            break
    return "\n".join(lines[:end])
