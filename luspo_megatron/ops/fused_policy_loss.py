"""The fused sequence log-ratio + policy loss: csrc/ kernels behind a ``torch.autograd.Function``.

Forward: phase 1 (one pass over the tokens: per-sequence sums [B, k]), one ``all_reduce(SUM)`` of those
sums over the context-parallel group, then phase 2 (one pass: loss, per-sequence metric table and the
gradient w.r.t. ``logp``, written in the same pass). The math is in csrc/seq_logratio.h.

**Context parallel.** Each CP rank holds only chunks of every sequence (Megatron's zigzag layout), so
its phase-1 sums are partial; the all-reduce moves B·k numbers, never the token-level log-probs. Rank
r's loss L_r depends on the other ranks' tokens through S_i (gspo/luspo), so the gradient at a token of
rank q is ∂(Σ_r L_r)/∂logp_t = W_i·∂ℓ_i/∂logp_t with W_i = Σ_{u∈i} a_u w_u over *every* rank's tokens.
W_i is a function of the all-reduced sums (n_i, w_i, or the U_i column for token TIS), so phase 2 writes
that exact gradient locally and backward needs no collective, *provided every CP rank back-propagates
its loss with the same grad_output* — which Megatron's schedule does (one loss scale, one
1/num_microbatches for all ranks of a CP group). This is the "each rank accounts for all ranks' loss
terms" form of the all-reduce-in-backward that the reference gets from torch.distributed.nn.

**Pipeline parallel.** The op runs only on the last pipeline stage, where the log-probs are; a sequence
is never split across micro-batches (data.packing), so every per-sequence sum is complete within one
call (up to the CP all-reduce above). Earlier stages hold no part of any S_i, so no cross-stage
reduction exists: the gradient w.r.t. ``logp`` flows back through the pipeline like any activation
gradient.

**Backward: stored gradient, not recomputed.** Forward writes ∂L/∂logp (one token-sized array) in the
same pass that computes the loss; backward scales it by grad_output in place and returns it, so the
whole forward+backward allocates one token-sized array (the gradient itself); a second backward
through the same graph (``retain_graph=True``) recomputes. Recomputing always (phase 2 again in
backward, ``grad_mode="recompute"``) holds nothing token-sized between forward and backward but
re-reads every input and recomputes the exps; benchmarks/bench_seq_logratio.py measures both
(docs/bench/seq_logratio.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from luspo_megatron.ops._extension import require
from luspo_megatron.ops.segments import segment_ids

# Columns of the per-sequence table (csrc/seq_logratio.h, enum TableCol).
TABLE_COLUMNS = (
    "pg_loss", "kl_loss", "tokens", "abs_delta", "clipped_tokens", "tis_weight", "tis_truncated", "tis_masked", "kl",
    "grad_abs", "tis_ratio_max", "seq_clipped", "nonempty", "seq_ratio", "seq_tis_truncated", "seq_tis_masked",
    "seq_tis_ratio",
)
COL = {name: j for j, name in enumerate(TABLE_COLUMNS)}
GRAD_MODES = ("store", "recompute")
DEFAULT_GRAD_MODE = "store"


@dataclass(frozen=True)
class PolicyLossSpec:
    """The scalar configuration of the fused op (what ``LossConfig`` resolves to for one call)."""

    loss: str
    agg: str
    eps_lo: float
    eps_hi: float
    num_sequences: float
    """Global B of the optimizer step."""
    num_tokens: float = -1.0
    """token-mean normaliser N; < 0: Σ_i |y_i| of this call (CP-global)."""
    max_len: float = -1.0
    """L_max of seq-mean-token-sum-norm; < 0: max_i |y_i| of this call."""
    tis_level: str = "none"
    """"none", "token", "sequence" or "geometric" (algorithms/tis.py)."""
    tis_clip: float = 1.0
    tis_mode: str = "truncate"
    """"truncate" or "mask"."""
    tis_lower: float = 0.0
    """lo of mask mode (0 < lo < tis_clip); unused by truncate."""
    kl_type: str = "none"
    """"none" (no ref_logp: no KL metric), "k1", "k2" or "k3"."""
    kl_coef: float = 0.0


class FusedPolicyLoss(NamedTuple):
    loss: torch.Tensor
    """0-dim, differentiable w.r.t. logp: Σ_t a_t (w_t·pg_t + β·KL_t) over this rank's tokens."""
    table: torch.Tensor
    """[B, 17] per-sequence metric sums (TABLE_COLUMNS), no gradient."""
    sums: torch.Tensor
    """[B, k] global per-sequence sums: Σ m·δ, |y_i| (, the TIS column), no gradient."""


def _cp_active(cp_group) -> bool:
    return cp_group is not None and torch.distributed.get_world_size(cp_group) > 1


def _phase2(spec: PolicyLossSpec, inputs, sums, write_grad: bool, grad_scale):
    logp, old_logp, rollout_logp, ref_logp, mask, cu_seqlens, advantages = inputs
    return torch.ops.luspo.seq_policy_loss_phase2(
        logp, old_logp, rollout_logp, ref_logp, mask, cu_seqlens, advantages, sums,
        spec.loss, spec.agg, spec.tis_level, spec.tis_mode, spec.kl_type, spec.eps_lo, spec.eps_hi, spec.tis_clip,
        spec.tis_lower, spec.kl_coef, spec.num_sequences, spec.num_tokens, spec.max_len, write_grad, grad_scale,
    )


class _FusedPolicyLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old_logp, rollout_logp, ref_logp, mask, cu_seqlens, advantages, spec, cp_group, grad_mode):
        sums = torch.ops.luspo.seq_logratio_phase1(
            logp, old_logp, rollout_logp, mask, cu_seqlens, spec.loss, spec.tis_level, spec.tis_mode, spec.tis_clip,
            spec.tis_lower,
        )
        if _cp_active(cp_group):
            torch.distributed.all_reduce(sums, group=cp_group)
        inputs = (logp, old_logp, rollout_logp, ref_logp, mask, cu_seqlens, advantages)
        store = grad_mode == "store" and ctx.needs_input_grad[0]
        table, grad = _phase2(spec, inputs, sums, store, None)
        loss = table[:, : COL["kl_loss"] + 1].sum()  # Σ_i (pg_i + kl_i), fixed order: deterministic
        ctx.spec = spec
        # The stored gradient is an intermediate, neither input nor output, so it lives on ctx (torch's
        # rule for save_for_backward): backward scales it in place and hands it over, so forward+backward
        # allocate one token-sized array in all. The inputs are saved too (references, no copies): a
        # second backward through the same graph (retain_graph, gradcheck) recomputes from them.
        ctx.grad = grad if store else None
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(*inputs, sums)
        ctx.mark_non_differentiable(table, sums)
        return loss, table, sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_table, _grad_sums):
        if ctx.grad is not None:
            grad, ctx.grad = ctx.grad, None
            grad_logp = grad.mul_(grad_loss.to(grad.dtype))
        else:
            *inputs, sums = ctx.saved_tensors
            _, grad_logp = _phase2(ctx.spec, inputs, sums, True, grad_loss.detach())
        return grad_logp, None, None, None, None, None, None, None, None, None


def _harmonise(logp: torch.Tensor, others: list[torch.Tensor | None]) -> tuple[torch.Tensor, list]:
    """The kernels read all token arrays in one dtype: logp's when they agree (no copies, the usual case),
    else the accumulation dtype (float64 for float64 logp, float32 otherwise), as the reference casts."""
    if all(o is None or o.dtype == logp.dtype for o in others):
        return logp, others
    dtype = torch.float64 if logp.dtype == torch.float64 else torch.float32
    return logp.to(dtype), [None if o is None else o.to(dtype) for o in others]


def seq_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    loss_mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    advantages: torch.Tensor,
    spec: PolicyLossSpec,
    rollout_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    cp_group: "torch.distributed.ProcessGroup | None" = None,
    grad_mode: str | None = None,
) -> FusedPolicyLoss:
    """Fused policy loss of one packed micro-batch on the last pipeline stage (see the module docstring).

    ``logp``/``old_logp``/``loss_mask`` (and ``rollout_logp`` when ``spec.tis_level`` is not "none",
    ``ref_logp`` when ``spec.kl_type`` is not "none") are [T]; ``cu_seqlens`` is [B+1]; ``advantages`` is
    [B], or [T] for grpo and gspo_token. Tokens outside ``cu_seqlens`` get zero loss and gradient.
    Needs the extension (``luspo_megatron.ops.fused_available``); the entropy bonus is not part of it.
    ``grad_mode``: "store" or "recompute" (module docstring); None: ``DEFAULT_GRAD_MODE``.
    """
    grad_mode = DEFAULT_GRAD_MODE if grad_mode is None else grad_mode
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode: expected one of {GRAD_MODES}, got {grad_mode!r}")
    tracing = torch.compiler.is_compiling()  # under torch.compile: no host-side loading or data checks
    if not tracing:
        require()
    rollout_logp = rollout_logp if spec.tis_level != "none" else None
    ref_logp = ref_logp if spec.kl_type != "none" else None
    logp, (old_logp, rollout_logp, ref_logp) = _harmonise(logp, [old_logp, rollout_logp, ref_logp])
    if loss_mask.dtype not in (torch.bool, torch.uint8, logp.dtype):
        loss_mask = loss_mask.to(logp.dtype)
    acc = torch.float64 if logp.dtype == torch.float64 else torch.float32
    advantages = advantages.to(acc)
    if not tracing and cu_seqlens.device.type == "cpu" and logp.device.type == "cpu":
        _check_cu_seqlens(cu_seqlens, logp.numel())
    return FusedPolicyLoss(*_FusedPolicyLossFn.apply(
        logp, old_logp, rollout_logp, ref_logp, loss_mask, cu_seqlens, advantages, spec, cp_group, grad_mode
    ))


def _check_cu_seqlens(cu_seqlens: torch.Tensor, total_tokens: int) -> None:
    # One-line errors here; the C++ TORCH_CHECKs would say the same with a C++ backtrace attached.
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens: expected [B+1] sequence boundaries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens: expected int32/int64, got {cu_seqlens.dtype}")
    if cu_seqlens.numel() > 1 and bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError("cu_seqlens: expected non-decreasing boundaries")
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) > total_tokens:
        raise ValueError(f"cu_seqlens: expected cu[0] = 0 and cu[-1] ≤ T = {total_tokens}, got "
                         f"{int(cu_seqlens[0])} and {int(cu_seqlens[-1])}")


class _SeqSumsFn(torch.autograd.Function):
    """Phase 1 alone (``ops.seq_logratio`` on the extension): sums [B, k], CP-all-reduced, differentiable
    in column 0 (S_i) w.r.t. logp. Here the caller's loss is arbitrary, so backward all-reduces the
    gradient w.r.t. the sums over the CP group (every rank's loss depends on every rank's tokens)."""

    @staticmethod
    def forward(ctx, logp, old_logp, rollout_logp, mask, cu_seqlens, cp_group):
        sums = torch.ops.luspo.seq_logratio_phase1(
            logp, old_logp, rollout_logp, mask, cu_seqlens, "luspo",
            "sequence" if rollout_logp is not None else "none", "truncate", 1.0, 0.0,
        )
        if _cp_active(cp_group):
            torch.distributed.all_reduce(sums, group=cp_group)
        ctx.cp_group, ctx.logp_dtype = cp_group, logp.dtype
        ctx.save_for_backward(mask, cu_seqlens)
        return sums

    @staticmethod
    def backward(ctx, grad_sums):
        mask, cu_seqlens = ctx.saved_tensors
        grad_s = grad_sums[:, 0].contiguous()
        if _cp_active(ctx.cp_group):
            torch.distributed.all_reduce(grad_s, group=ctx.cp_group)
        # ∂S_i/∂logp_t = m_t for t in sequence i; padding (segment B) gets 0.
        seg = segment_ids(cu_seqlens, mask.numel())
        grad = torch.cat([grad_s, grad_s.new_zeros(1)])[seg] * mask.to(grad_s.dtype)
        return grad.to(ctx.logp_dtype), None, None, None, None, None


def seq_sums(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    loss_mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    rollout_logp: torch.Tensor | None = None,
    cp_group: "torch.distributed.ProcessGroup | None" = None,
) -> torch.Tensor:
    """[B, k] per-sequence sums from the extension (k = 3 with rollout_logp); see ops.seq_logratio."""
    require()
    logp, (old_logp, rollout_logp) = _harmonise(logp, [old_logp, rollout_logp])
    if loss_mask.dtype not in (torch.bool, torch.uint8, logp.dtype):
        loss_mask = loss_mask.to(logp.dtype)
    if cu_seqlens.device.type == "cpu" and logp.device.type == "cpu":
        _check_cu_seqlens(cu_seqlens, logp.numel())
    return _SeqSumsFn.apply(logp, old_logp, rollout_logp, loss_mask, cu_seqlens, cp_group)
