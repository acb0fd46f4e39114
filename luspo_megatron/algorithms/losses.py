"""Policy losses on packed (THD) sequences: LUSPO, GSPO, GSPO-token and GRPO (docs/design.md §2).

Notation (per packed token t of sequence i): m_t the loss mask, δ_t = logp_t − old_logp_t,
|y_i| = Σ_t m_t, Â the advantage, B the GLOBAL number of sequences in the optimizer step.

    grpo        r_t  = exp(δ_t)                                 per-token ratio
    gspo        s_i  = exp((1/|y_i|) Σ_t m_t δ_t)               sequence ratio (geometric mean)
    gspo_token  s_it = sg[s_i] · exp(logp_t − sg[logp_t])       value s_i, gradient per token
    luspo       s_i  as GSPO

    ℓ = −min(ratio · Â, clip(ratio, 1 − ε_lo, 1 + ε_hi) · Â)    (PPO clip; clip-higher ε_hi)

Every loss is written as a per-token term, then aggregated. The term is the policy part (times the
importance weight w against the rollout engine when ``use_tis``: algorithms/tis.py, per token or per
sequence, truncated or masked), plus β·KL_t, minus c·H_t:

    grpo        agg ∈ token-mean           Σ m·term / N_tokens (global)
                      seq-mean-token-mean  (1/B) Σ_i (1/|y_i|) Σ_t m·term
                      seq-mean-token-sum   (1/B) Σ_i Σ_t m·term
                      seq-mean-token-sum-norm  (1/(B·L_max)) Σ_i Σ_t m·term   (Dr.GRPO)
    gspo, gspo_token  seq-mean-token-mean  → (1/B) Σ_i ℓ_i when there is no token-level term
    luspo             seq-mean-token-sum   → (1/B) Σ_i |y_i| ℓ_i

LUSPO is therefore a *masked per-sequence token sum divided by B*. It is never "an already
per-token loss multiplied by |y_i|", which would weight sequences by |y_i|² as soon as any
token-level term (KL, token TIS, entropy) is present (TRL PR #6654).

Why LUSPO is length-unbiased: ∂s_i/∂θ = s_i · (1/|y_i|) Σ_t ∇logp_t, and the |y_i| of the
aggregation cancels the 1/|y_i|, so (inside the clip range) every token's gradient weight is
−s_i·Â_i/B whatever the length. GSPO weights every token of sequence i by −s_i·Â_i/(B·|y_i|).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from luspo_megatron.algorithms import metrics as metrics_lib
from luspo_megatron.algorithms.kl import kl_estimate
from luspo_megatron.algorithms.tis import SEQUENCE_TIS_LEVELS, sequence_log_ratio, tis_weights

# The loss options are configuration: named, defaulted and validated in config/loss.py; handed on here.
from luspo_megatron.config.loss import AGG_MODES, DEFAULT_CLIPS, LOSS_NAMES, SEQUENCE_RATIO_LOSSES, LossConfig
from luspo_megatron.ops import PolicyLossSpec, fused_available, segment_ids, seq_logratio_reference, seq_policy_loss

__all__ = ["AGG_MODES", "DEFAULT_CLIPS", "LOSS_NAMES", "SEQUENCE_RATIO_LOSSES", "LossConfig", "aggregation_weights",
           "clipped_surrogate", "policy_grad_coefficient", "policy_loss"]


class ClippedSurrogate(NamedTuple):
    loss: torch.Tensor  # −min(ratio·Â, clip(ratio)·Â)
    clipped: torch.Tensor  # bool: the clipped branch is selected, so the ratio gets no gradient


def clipped_surrogate(ratio: torch.Tensor, adv: torch.Tensor, eps_lo: float, eps_hi: float) -> ClippedSurrogate:
    """PPO's pessimistic clipped surrogate, elementwise. ``torch.where`` (not max) so that the
    gradient is exactly that of the selected branch, with no tie splitting."""
    unclipped = -ratio * adv
    clipped = -ratio.clamp(1.0 - eps_lo, 1.0 + eps_hi) * adv
    active = clipped > unclipped
    return ClippedSurrogate(torch.where(active, clipped, unclipped), active)


def aggregation_weights(
    agg: str,
    mask: torch.Tensor,
    seq_len_per_token: torch.Tensor,
    num_sequences: int,
    num_tokens: float | torch.Tensor,
    max_response_len: float | torch.Tensor,
) -> torch.Tensor:
    """a_t with loss = Σ_t a_t · term_t; includes the mask. All normalisers are global.
    An empty batch (no response token) gets weight 0 everywhere, never 0/0."""
    if agg == "token-mean":
        return mask / (num_tokens.clamp(min=1) if torch.is_tensor(num_tokens) else max(num_tokens, 1.0))
    if agg == "seq-mean-token-mean":
        return mask / (seq_len_per_token.clamp(min=1) * num_sequences)
    if agg == "seq-mean-token-sum":
        return mask / num_sequences
    if agg == "seq-mean-token-sum-norm":
        if torch.is_tensor(max_response_len):
            max_response_len = max_response_len.clamp(min=1)
        return mask / (num_sequences * max_response_len)
    raise ValueError(f"agg: expected one of {AGG_MODES}, got {agg!r}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 stays float64 (tests compare at 1e-10); bf16/fp16 accumulate in float32.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_token(values: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """Broadcast a [B] per-sequence tensor to the packed tokens; padding tokens (seg == B) get 0."""
    return torch.cat([values, values.new_zeros(1)])[seg]


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    config: LossConfig,
    num_sequences: int,
    num_tokens: int | None = None,
    rollout_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    cp_group: "torch.distributed.ProcessGroup | None" = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss contribution of one packed micro-batch, and its metrics.

    ``logp``/``old_logp``/``loss_mask`` (and the optional ``rollout_logp``, ``ref_logp``,
    ``entropy``) are [T]; ``cu_seqlens`` is [B_local + 1]; ``advantages`` is [B_local] per
    sequence, or [T] per token for grpo and gspo_token.

    ``num_sequences`` is the GLOBAL B of the optimizer step and ``num_tokens`` the global response
    token count (token-mean only; None means this call's count). With them the losses of any
    split into micro-batches and ranks sum to the full-batch loss. ``cp_group``: the context-parallel
    group when each rank holds only chunks of every sequence (per-sequence sums are all-reduced).

    Runs on the csrc extension when it is built for ``logp``'s device (``luspo_megatron.ops.backend()``),
    else on the pure-PyTorch reference; both give the same loss, gradient and metrics. Tokens past
    ``cu_seqlens[-1]`` are padding: they contribute nothing, whatever their mask.
    """
    if num_sequences < 1:
        raise ValueError(f"num_sequences: expected the global sequence count ≥ 1, got {num_sequences}")
    if config.use_tis and rollout_logp is None:
        raise ValueError("use_tis=True needs rollout_logp")
    if config.kl_coef > 0 and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp")
    if config.entropy_coef > 0 and entropy is None:
        raise ValueError("entropy_coef > 0 needs entropy")
    num_seqs, total_tokens = cu_seqlens.numel() - 1, logp.numel()
    if not (advantages.numel() == num_seqs or (advantages.numel() == total_tokens and not config.sequence_level)):
        raise ValueError(
            f"advantages: expected [{num_seqs}] per sequence"
            + ("" if config.sequence_level else f" or [{total_tokens}] per token")
            + f" for {config.name}, got {tuple(advantages.shape)}"
        )
    args = (logp, old_logp, advantages, loss_mask, cu_seqlens, config, num_sequences, num_tokens,
            rollout_logp, ref_logp, entropy, cp_group)
    if fused_available(logp.device):
        return _policy_loss_fused(*args)
    return _policy_loss_reference(*args)


def _policy_loss_reference(
    logp, old_logp, advantages, loss_mask, cu_seqlens, config, num_sequences, num_tokens, rollout_logp, ref_logp,
    entropy, cp_group,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The pure-PyTorch reference of ``policy_loss`` (eager, autograd; also the fallback without a build)."""
    dtype = _compute_dtype(logp.dtype)
    logp, old_logp = logp.to(dtype), old_logp.to(dtype)
    total_tokens = logp.numel()
    num_seqs = cu_seqlens.numel() - 1
    seg = segment_ids(cu_seqlens, total_tokens)
    mask = loss_mask.to(dtype) * (seg < num_seqs)  # padding past cu_seqlens[-1] is never a response token
    rollout = rollout_logp.to(dtype) if rollout_logp is not None else None

    seq_tis = config.use_tis and config.tis_level in SEQUENCE_TIS_LEVELS
    # One segment reduction: Σ m·δ, |y_i| and Σ m·(old − rollout), global over CP.
    sums = seq_logratio_reference(logp, old_logp, mask, cu_seqlens, rollout_logp=rollout if seq_tis else None,
                                  cp_group=cp_group)
    seq_len = sums.num_tokens  # [B], |y_i|
    seq_len_t = _per_token(seq_len, seg)
    adv = advantages.to(dtype)
    if adv.numel() == num_seqs:
        adv_seq, adv_t = adv, _per_token(adv, seg)
    else:
        adv_seq, adv_t = None, adv

    eps_lo, eps_hi = config.eps_clip, config.eps_clip_high
    log_seq_ratio = sums.sum_delta / seq_len.clamp(min=1)  # (1/|y_i|) Σ m δ; 0 for empty sequences
    if config.name == "grpo":
        ratio_t = torch.exp(logp - old_logp)
        surrogate = clipped_surrogate(ratio_t, adv_t, eps_lo, eps_hi)
        pg_t, clipped_t = surrogate.loss, surrogate.clipped
    elif config.name == "gspo_token":
        seq_ratio_t = _per_token(torch.exp(log_seq_ratio).detach(), seg)
        ratio_t = seq_ratio_t * torch.exp(logp - logp.detach())  # value s_i, gradient through logp_t only
        surrogate = clipped_surrogate(ratio_t, adv_t, eps_lo, eps_hi)
        pg_t, clipped_t = surrogate.loss, surrogate.clipped
    else:  # gspo, luspo: one ratio, one clip decision per sequence
        seq_ratio = torch.exp(log_seq_ratio)
        surrogate = clipped_surrogate(seq_ratio, adv_seq, eps_lo, eps_hi)
        pg_t = _per_token(surrogate.loss, seg)
        clipped_t = _per_token(surrogate.clipped, seg)

    tis_w_t = tis = None
    if config.use_tis:
        if seq_tis:  # one weight per sequence: ρ_i from Σ_t m_t (old − rollout), global over CP
            log_rho = sequence_log_ratio(sums.sum_rollout_log_ratio, seq_len, config.tis_level)  # [B]
            tis = tis_weights(log_rho, config.tis_mode, config.tis_clip, config.tis_lower)
            tis_w_t = _per_token(tis.weight, seg)
        else:  # ρ_t = exp(old_t − rollout_t); prompt and padding tokens read 0 (their garbage never enters)
            log_rho_t = torch.where(mask > 0, old_logp - rollout, torch.zeros_like(old_logp))  # [T]
            tis = tis_weights(log_rho_t, config.tis_mode, config.tis_clip, config.tis_lower)
            tis_w_t = tis.weight
        pg_t = pg_t * tis_w_t  # w_t · ℓ: the weight multiplies the policy term only

    term_t = pg_t
    kl_t = None
    if ref_logp is not None:
        kl_t = kl_estimate(logp, ref_logp.to(dtype), config.kl_type)
        if config.kl_coef > 0:
            term_t = term_t + config.kl_coef * kl_t
    entropy_t = entropy.to(dtype) if entropy is not None else None
    if config.entropy_coef > 0:
        term_t = term_t - config.entropy_coef * entropy_t

    global_tokens, max_len = _call_normalisers(config, num_tokens, seq_len)
    weight_t = aggregation_weights(config.agg, mask, seq_len_t, num_sequences, global_tokens, max_len)
    loss = (weight_t * term_t).sum()

    with torch.no_grad():
        grad_t = policy_grad_coefficient(
            config,
            weight_t=weight_t,
            mask=mask,
            ratio_t=ratio_t if not config.sequence_level else None,
            adv_t=adv_t,
            clipped_t=clipped_t,
            tis_w_t=tis_w_t,
            seq_ratio=seq_ratio if config.sequence_level else None,
            adv_seq=adv_seq,
            seq_clipped=surrogate.clipped if config.sequence_level else None,
            seg=seg,
            seq_len=seq_len,
            cp_group=cp_group,
        )
        stats = metrics_lib.policy_loss_metrics(
            config=config,
            loss=loss,
            pg_loss=(weight_t * pg_t).sum(),
            mask=mask,
            seg=seg,
            seq_len=seq_len,
            log_seq_ratio=log_seq_ratio,
            delta=logp - old_logp,
            clipped_t=clipped_t,
            seq_clipped=surrogate.clipped if config.sequence_level else None,
            grad_weight_t=grad_t.abs(),
            tis_w_t=tis_w_t,
            tis=tis,
            kl_t=kl_t,
            entropy_t=entropy_t,
            cp_group=cp_group,
        )
    return loss, stats


def _call_normalisers(
    config: LossConfig, num_tokens: int | None, seq_len: torch.Tensor
) -> tuple[float | torch.Tensor, float | torch.Tensor]:
    """N of token-mean and L_max of seq-mean-token-sum-norm for this call. Without ``num_tokens`` N is
    Σ_i |y_i| of the call: global over CP, because ``seq_len`` is. Normalisers stay tensors when they come
    from the data, so nothing syncs with the device here."""
    global_tokens = float(num_tokens) if num_tokens is not None else seq_len.sum()
    if config.agg == "seq-mean-token-sum-norm" and config.max_response_len is None:
        max_len = seq_len.max() if seq_len.numel() else 1.0
    else:
        max_len = float(config.max_response_len or 1)
    return global_tokens, max_len


def _policy_loss_fused(
    logp, old_logp, advantages, loss_mask, cu_seqlens, config, num_sequences, num_tokens, rollout_logp, ref_logp,
    entropy, cp_group,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``policy_loss`` on the csrc extension (ops.seq_policy_loss): the policy and KL terms, their
    gradient and the metrics in two passes over the tokens. The entropy bonus stays here in torch: its
    gradient flows to the logits through ``entropy``, not through ``logp``."""
    spec = PolicyLossSpec(
        loss=config.name,
        agg=config.agg,
        eps_lo=config.eps_clip,
        eps_hi=config.eps_clip_high,
        num_sequences=float(num_sequences),
        num_tokens=float(num_tokens) if num_tokens is not None else -1.0,
        max_len=float(config.max_response_len) if config.max_response_len is not None else -1.0,
        tis_level=config.tis_level if config.use_tis else "none",
        tis_clip=config.tis_clip,
        tis_mode=config.tis_mode,
        tis_lower=config.tis_lower if config.tis_lower is not None else 0.0,
        kl_type=config.kl_type if ref_logp is not None else "none",
        kl_coef=config.kl_coef,
    )
    out = seq_policy_loss(logp, old_logp, loss_mask, cu_seqlens, advantages, spec, rollout_logp=rollout_logp,
                          ref_logp=ref_logp, cp_group=cp_group)
    loss, seq_len = out.loss, out.sums[:, 1]
    entropy_mean = None
    if entropy is not None:
        dtype = loss.dtype
        seg = segment_ids(cu_seqlens, logp.numel())
        mask = loss_mask.to(dtype) * (seg < seq_len.numel())
        entropy_t = entropy.to(dtype)
        entropy_mean = (entropy_t.detach() * mask).sum() / mask.sum().clamp(min=1)
        if config.entropy_coef > 0:
            global_tokens, max_len = _call_normalisers(config, num_tokens, seq_len)
            weight_t = aggregation_weights(config.agg, mask, _per_token(seq_len, seg), num_sequences, global_tokens,
                                           max_len)
            loss = loss - config.entropy_coef * (weight_t * entropy_t).sum()
    stats = metrics_lib.metrics_from_table(
        config=config, loss=loss, table=out.table, seq_len=seq_len, has_kl=ref_logp is not None,
        entropy_mean=entropy_mean, cp_group=cp_group,
    )
    return loss, stats


def policy_grad_coefficient(
    config: LossConfig,
    *,
    weight_t: torch.Tensor,
    mask: torch.Tensor,
    ratio_t: torch.Tensor | None,
    adv_t: torch.Tensor,
    clipped_t: torch.Tensor,
    tis_w_t: torch.Tensor | None,
    seq_ratio: torch.Tensor | None,
    adv_seq: torch.Tensor | None,
    seq_clipped: torch.Tensor | None,
    seg: torch.Tensor,
    seq_len: torch.Tensor,
    cp_group: "torch.distributed.ProcessGroup | None" = None,
) -> torch.Tensor:
    """g_t = ∂(policy part of the loss)/∂logp_t in closed form, [T], without autograd.

    token ratios (grpo, gspo_token):  g_t = −a_t · w_t · Â_t · ratio_t · [not clipped_t]
    sequence ratios (gspo, luspo):    g_t = −W_i · Â_i · s_i · [not clipped_i] · m_t / |y_i|,
                                      W_i = Σ_{t∈i} a_t·w_t  (= 1/B for gspo, |y_i|/B for luspo without TIS)

    With CP, W_i sums over every rank's chunks of sequence i, hence the all-reduce.
    """
    w = tis_w_t if tis_w_t is not None else torch.ones_like(weight_t)
    if not config.sequence_level:
        return -weight_t * w * adv_t * ratio_t.detach() * (~clipped_t)
    num_seqs = seq_len.numel()
    seq_weight = weight_t.new_zeros(num_seqs + 1).index_add(0, seg, weight_t * w)[:num_seqs]
    if cp_group is not None and torch.distributed.get_world_size(cp_group) > 1:
        torch.distributed.all_reduce(seq_weight, group=cp_group)
    per_seq = -seq_weight * adv_seq * seq_ratio.detach() * (~seq_clipped) / seq_len.clamp(min=1)
    return _per_token(per_seq, seg) * mask
