"""Loading the csrc extension (``luspo_megatron._C``) and choosing the backend.

The extension registers two custom ops, ``torch.ops.luspo.seq_logratio_phase1`` and
``torch.ops.luspo.seq_policy_loss_phase2`` (csrc/bindings.cpp). This module imports it once, registers
their fake (meta) kernels so that torch.compile can trace them, and answers which backend a call on a
given device will use. A missing build is not an error: the pure-PyTorch reference takes over, with one
warning per process. ``LUSPO_FORCE_REFERENCE=1`` (read at every call) selects the reference.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

FORCE_REFERENCE_ENV = "LUSPO_FORCE_REFERENCE"
SEQUENCE_LEVEL = ("gspo", "luspo")
NUM_TABLE_COLS = 17  # csrc/seq_logratio.h, enum TableCol


def num_sum_cols(loss: str, tis_level: str) -> int:
    """k of the phase-1 sums [B, k] (csrc/seq_logratio.h, num_sum_cols)."""
    tis_col = tis_level in ("sequence", "geometric") or (tis_level == "token" and loss in SEQUENCE_LEVEL)
    return 3 if tis_col else 2


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.cache  # once per process, even if the extension is loaded again after a cache_clear
def _register_fakes() -> None:
    @torch.library.register_fake("luspo::seq_logratio_phase1")
    def _phase1(logp, old_logp, rollout_logp, loss_mask, cu_seqlens, loss, tis_level, tis_mode, tis_clip, tis_lower):
        k = num_sum_cols(loss, tis_level)
        return logp.new_empty((cu_seqlens.shape[0] - 1, k), dtype=_acc_dtype(logp.dtype))

    @torch.library.register_fake("luspo::seq_policy_loss_phase2")
    def _phase2(logp, old_logp, rollout_logp, ref_logp, loss_mask, cu_seqlens, advantages, sums, loss, agg,
                tis_level, tis_mode, kl_type, eps_lo, eps_hi, tis_clip, tis_lower, kl_coef, num_sequences, num_tokens,
                max_len, write_grad, grad_scale):
        table = logp.new_empty((cu_seqlens.shape[0] - 1, NUM_TABLE_COLS), dtype=_acc_dtype(logp.dtype))
        grad = logp.new_empty((logp.shape[0] if write_grad else 0,))
        return table, grad


@functools.cache
def _load() -> bool:
    try:
        import luspo_megatron._C  # noqa: F401  (registers the ops)
    except ImportError as exc:
        warnings.warn(
            f"luspo_megatron._C is not built ({exc}); the policy loss uses the pure-PyTorch reference. "
            "Build it with `make venv` (or `pip install --no-build-isolation -e .`).",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    _register_fakes()
    return True


@functools.cache
def _has_cuda_kernels() -> bool:
    return _load() and torch._C._dispatch_has_kernel_for_dispatch_key("luspo::seq_logratio_phase1", "CUDA")


@functools.cache
def _warn_no_cuda_kernels() -> None:
    warnings.warn(
        "luspo_megatron._C was built without CUDA kernels; CUDA tensors use the pure-PyTorch reference.",
        RuntimeWarning,
        stacklevel=4,
    )


def require() -> None:
    """Load the extension for a direct call of the fused ops; a clear error when it is not built."""
    if not _load():
        raise RuntimeError("luspo_megatron._C is not built: run `make venv` (or use luspo_megatron.ops.backend())")


def forced_reference() -> bool:
    return os.environ.get(FORCE_REFERENCE_ENV) == "1"


def fused_available(device: torch.device) -> bool:
    """True when the extension has a kernel for tensors on ``device`` (and the reference is not forced)."""
    if forced_reference() or not _load():
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda" and _has_cuda_kernels():
        return True
    if device.type == "cuda":
        _warn_no_cuda_kernels()
    return False


def backend() -> str:
    """Which implementation ``policy_loss`` uses: "cuda" (extension, CUDA tensors on this machine), "cpp"
    (extension, CPU tensors) or "reference" (pure PyTorch: forced, or no build)."""
    if forced_reference() or not _load():
        return "reference"
    if _has_cuda_kernels() and torch.cuda.is_available():
        return "cuda"
    return "cpp"
