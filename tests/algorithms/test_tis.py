"""Importance correction against the rollout engine (algorithms/tis.py) through policy_loss, on the csrc extension
and on the pure-PyTorch reference: sequence-level truncated TIS equals a float64 transcription of TRL's
GRPOTrainer, masking (MIS / IcePop) counts and bounds, zero weight and zero gradient for dropped terms, and
finite weights when exp(Σ log-ratio) overflows. The float64 oracle of every level × mode is in test_losses.py."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from luspo_megatron.algorithms.losses import LossConfig, policy_loss
from luspo_megatron.algorithms.tis import TIS_LEVELS, TIS_MODES, sequence_log_ratio, tis_weights
from luspo_megatron.ops import fused_available, seq_logratio_reference
from tests.algorithms.naive import naive_policy_loss
from tests.algorithms.packed import random_packed_batch

TOL = 1e-10
BACKENDS = ["cpp", "reference"]


@pytest.fixture
def backend(monkeypatch, request):
    if request.param == "reference":
        monkeypatch.setenv("LUSPO_FORCE_REFERENCE", "1")
    else:
        monkeypatch.delenv("LUSPO_FORCE_REFERENCE", raising=False)
    assert fused_available(torch.device("cpu")) == (request.param == "cpp")
    return request.param


# ------------------------------------------------------------------------------------------------ TRL
def trl_sequence_truncate_loss(logp, old, sampling, mask, adv, *, eps_lo, eps_hi, clip_max, loss_type):
    """TRL GRPOTrainer (huggingface/trl f2cd577, trl/trainer/grpo_trainer.py), transcribed in float64 for
    ``vllm_importance_sampling_mode="sequence_truncate"``, ``importance_sampling_level="sequence"`` for luspo and
    "token" for grpo, beta = 0, one process, no gradient accumulation. Inputs are padded [B, T]; adv is [B]."""
    # _generate_and_score_completions: the vLLM importance sampling ratio, (B, 1) for sequence_* modes
    per_token_logps_diff = (old - sampling) * mask
    per_sequence_logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
    is_ratio = torch.exp(per_sequence_logps_diff)
    is_ratio = torch.clamp(is_ratio, min=None, max=clip_max)  # vllm_importance_sampling_clip_min=None
    # _compute_loss
    advantages = adv.unsqueeze(1)
    log_ratio = logp - old
    if loss_type == "luspo":  # importance_sampling_level="sequence"
        log_importance_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:  # importance_sampling_level="token"
        log_importance_weights = log_ratio
    coef_1 = torch.exp(log_importance_weights)
    coef_2 = torch.clamp(coef_1, 1 - eps_lo, 1 + eps_hi)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    per_token_loss = per_token_loss * is_ratio
    if loss_type == "luspo":
        loss = (per_token_loss * mask.sum(1, keepdim=True)).mean()
    else:  # "grpo"
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    return loss, is_ratio.squeeze(1)


def _padded_batch():
    """B = 6 rows of T = 12 tokens, completion masks with right padding; per-row mismatch scales so that the
    sequence ratios Π_t ρ_t land on both sides of C = 2 (truncation active for some rows only)."""
    gen = torch.Generator().manual_seed(2024)
    B, T = 6, 12
    lengths = torch.tensor([12, 9, 5, 12, 3, 7])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    logp = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 2
    old = logp + torch.randn(B, T, generator=gen, dtype=torch.float64) * 1e-3
    shift = torch.tensor([0.15, -0.1, 0.3, 0.02, -0.4, 0.12], dtype=torch.float64)  # mean Δ per row
    sampling = old - shift[:, None] - torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.05
    adv = torch.tensor([1.0, -0.5, 0.7, -1.2, 0.3, 2.0], dtype=torch.float64)
    return logp, old, sampling, mask, adv


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("loss_type", ["luspo", "grpo"])
def test_sequence_truncated_tis_equals_trl_transcription(loss_type, backend):
    logp, old, sampling, mask, adv = _padded_batch()
    B, T = mask.shape
    eps_lo, eps_hi, C = 2e-3, 2.5e-3, 2.0
    trl_logp = logp.clone().requires_grad_(True)
    trl_loss, trl_weights = trl_sequence_truncate_loss(trl_logp, old, sampling, mask, adv, eps_lo=eps_lo,
                                                       eps_hi=eps_hi, clip_max=C, loss_type=loss_type)
    trl_loss.backward()
    assert (trl_weights == C).sum() >= 2 and (trl_weights < C).sum() >= 2, trl_weights  # truncation is active

    # The same batch packed: every row is one sequence of T tokens, its padding masked out.
    cu = torch.arange(0, B * T + 1, T, dtype=torch.int32)
    cfg = LossConfig(name=loss_type, agg="seq-mean-token-mean" if loss_type == "grpo" else None, eps_clip=eps_lo,
                     eps_clip_high=eps_hi, use_tis=True, tis_level="sequence", tis_mode="truncate", tis_clip=C)
    sums = seq_logratio_reference(logp.flatten(), old.flatten(), mask.flatten(), cu, rollout_logp=sampling.flatten())
    weights = tis_weights(sequence_log_ratio(sums.sum_rollout_log_ratio, sums.num_tokens, "sequence"),
                          "truncate", C).weight
    torch.testing.assert_close(weights, trl_weights, rtol=1e-14, atol=0)

    ours_logp = logp.flatten().clone().requires_grad_(True)
    loss, metrics = policy_loss(ours_logp, old.flatten(), adv, mask.flatten(), cu, cfg, num_sequences=B,
                                rollout_logp=sampling.flatten())
    loss.backward()
    assert abs(float(loss.detach()) - float(trl_loss.detach())) <= TOL * max(1.0, abs(float(trl_loss.detach())))
    torch.testing.assert_close(ours_logp.grad, trl_logp.grad.flatten(), rtol=0, atol=TOL)
    assert metrics["tis_truncated_frac"] == pytest.approx(float((trl_weights == C).double().mean()), abs=1e-15)

    # The geometric level (the old meaning of "sequence") is a different algorithm on the same inputs.
    geo, _ = policy_loss(logp.flatten(), old.flatten(), adv, mask.flatten(), cu,
                         dataclasses.replace(cfg, tis_level="geometric"), num_sequences=B,
                         rollout_logp=sampling.flatten())
    assert abs(float(geo) - float(trl_loss.detach())) > 0.05 * abs(float(trl_loss.detach()))


# --------------------------------------------------------------------------------------------- masking
def _direct_ratios(batch, level: str) -> tuple[list[float], list[float]]:
    """ρ of every term, computed here from the batch, and the weight m of each term."""
    cu = batch.cu_seqlens.tolist()
    ratios, weights = [], []
    for a, b in zip(cu, cu[1:]):
        m = batch.loss_mask[a:b]
        delta = [float(batch.old_logp[t] - batch.rollout_logp[t]) for t in range(a, b) if batch.loss_mask[t] != 0]
        if level == "token":
            ratios += [math.exp(d) for d in delta]
            weights += [1.0] * len(delta)
        elif delta:
            total = sum(delta)
            ratios.append(math.exp(total if level == "sequence" else total / float(m.sum())))
            weights.append(1.0)
    return ratios, weights


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("mode", TIS_MODES)
@pytest.mark.parametrize("level", TIS_LEVELS)
def test_truncated_and_masked_fractions_equal_a_direct_count(level, mode, backend):
    gen = torch.Generator().manual_seed(17)
    batch = random_packed_batch(gen, num_seqs=12, ratio_noise=1e-2, trailing_pad=4)
    clip, lower = {"token": (1.3, 0.8), "sequence": (3.0, 0.4), "geometric": (1.04, 0.97)}[level]
    cfg = LossConfig(name="luspo", use_tis=True, tis_level=level, tis_mode=mode, tis_clip=clip,
                     tis_lower=lower if mode == "mask" else None)
    _, metrics = policy_loss(batch.logp, batch.old_logp, batch.adv_seq, batch.loss_mask, batch.cu_seqlens, cfg,
                             batch.num_seqs, rollout_logp=batch.rollout_logp)
    ratios, _ = _direct_ratios(batch, level)
    above = sum(r > clip for r in ratios)
    below = sum(r < lower for r in ratios)
    assert above > 0 and (below > 0 or mode == "truncate") and above + below < len(ratios)
    assert metrics["tis_num_terms"] == len(ratios)
    assert metrics["tis_truncated_frac"] == pytest.approx(above / len(ratios) if mode == "truncate" else 0.0,
                                                          abs=1e-15)
    assert metrics["tis_masked_frac"] == pytest.approx((above + below) / len(ratios) if mode == "mask" else 0.0,
                                                       abs=1e-15)
    assert metrics["tis_ratio_max"] == pytest.approx(max(ratios), rel=1e-12)
    kept = [min(r, clip) if mode == "truncate" else (r if lower <= r <= clip else 0.0) for r in ratios]
    if level == "token":
        assert metrics["tis_weight_mean"] == pytest.approx(sum(kept) / len(kept), rel=1e-12)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("level", TIS_LEVELS)
def test_a_ratio_exactly_at_a_bound_is_kept_and_just_outside_is_masked(level, backend):
    # old == rollout: every ρ is exactly e^0 = 1 (in every exp implementation), on a bound of [lo, C] below.
    gen = torch.Generator().manual_seed(5)
    batch = random_packed_batch(gen, num_seqs=5, ratio_noise=1e-2)
    mask = batch.loss_mask
    args = (batch.old_logp, batch.adv_seq, mask, batch.cu_seqlens)
    plain, _ = policy_loss(batch.logp, *args, LossConfig(name="luspo"), batch.num_seqs)
    for clip, lower in ((1.0, 0.5), (2.0, 1.0)):  # ρ = C, then ρ = lo
        cfg = LossConfig(name="luspo", use_tis=True, tis_level=level, tis_mode="mask", tis_clip=clip, tis_lower=lower)
        loss, m = policy_loss(batch.logp, *args, cfg, batch.num_seqs, rollout_logp=batch.old_logp)
        assert m["tis_masked_frac"] == 0.0 and m["tis_weight_mean"] == 1.0
        assert float(loss) == pytest.approx(float(plain), rel=1e-14, abs=1e-15)
        # A 1e-9 step outside the range masks every term: the policy loss is exactly 0.
        step = -1e-9 if clip == 1.0 else 1e-9  # ρ slightly above C = 1, or slightly below lo = 1
        loss, m = policy_loss(batch.logp, *args, cfg, batch.num_seqs, rollout_logp=batch.old_logp + step * mask)
        assert m["tis_masked_frac"] == 1.0 and m["tis_weight_mean"] == 0.0 and float(loss) == 0.0


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_a_masked_token_gets_weight_zero_and_no_gradient_the_normaliser_is_unchanged(backend):
    # GRPO token-mean, token-level MIS with C = 3: token 4 has ρ = e^2 > C and is masked.
    logp = torch.tensor([-1.0, -0.5, -0.7, -0.2, -1.5, -0.9], dtype=torch.float64)
    old = logp - torch.tensor([0.0, 0.01, -0.02, 0.05, 0.0, 0.03], dtype=torch.float64)
    rollout = old - torch.tensor([0.0, 0.1, -0.1, 0.2, 2.0, 0.0], dtype=torch.float64)
    mask = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    cfg = LossConfig(name="grpo", use_tis=True, tis_level="token", tis_mode="mask", tis_clip=3.0)
    x = logp.clone().requires_grad_(True)
    loss, m = policy_loss(x, old, adv, mask, cu, cfg, 2, num_tokens=5, rollout_logp=rollout)
    loss.backward()
    assert m["tis_masked_frac"] == pytest.approx(1 / 5) and m["tis_num_terms"] == 5.0
    assert x.grad[4] == 0.0 and (x.grad[[1, 2, 3, 5]] != 0).all()
    # The same as dropping token 4 from the loss mask while keeping N = 5 (the normaliser is unchanged).
    drop = mask.clone()
    drop[4] = 0.0
    y = logp.clone().requires_grad_(True)
    expected, _ = policy_loss(y, old, adv, drop, cu, cfg, 2, num_tokens=5, rollout_logp=rollout)
    expected.backward()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), abs=1e-15)
    torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("level", ["sequence", "geometric"])
@pytest.mark.parametrize("name", ["luspo", "gspo", "grpo"])
def test_a_masked_sequence_gets_weight_zero_and_no_gradient_b_is_unchanged(name, level, backend):
    gen = torch.Generator().manual_seed(8)
    batch = random_packed_batch(gen, num_seqs=4, max_response=10, ratio_noise=1e-5)  # far inside every clip range
    cu = batch.cu_seqlens.tolist()
    assert all(batch.loss_mask[a:b].sum() > 0 for a, b in zip(cu, cu[1:]))
    rollout = batch.old_logp.clone()
    rollout[cu[2]:cu[3]] -= 1.0  # sequence 2: every response token Δ = +1, so ρ ≥ e^1 > C = 1.5
    cfg = LossConfig(name=name, agg="seq-mean-token-sum" if name == "grpo" else None, use_tis=True, tis_level=level,
                     tis_mode="mask", tis_clip=1.5)
    x = batch.fresh_logp()
    loss, m = policy_loss(x, batch.old_logp, batch.adv_seq, batch.loss_mask, batch.cu_seqlens, cfg, 4,
                          rollout_logp=rollout)
    loss.backward()
    assert m["tis_masked_frac"] == 0.25 and m["tis_num_terms"] == 4.0
    in_seq2 = torch.zeros_like(batch.loss_mask, dtype=torch.bool)
    in_seq2[cu[2]:cu[3]] = True
    assert (x.grad[in_seq2] == 0).all() and (x.grad[(batch.loss_mask > 0) & ~in_seq2] != 0).all()
    # Dropping sequence 2 (its mask to 0), B = 4 kept: the same loss and gradient.
    drop = batch.loss_mask.clone()
    drop[cu[2]:cu[3]] = 0.0
    y = batch.fresh_logp()
    expected, _ = policy_loss(y, batch.old_logp, batch.adv_seq, drop, batch.cu_seqlens, cfg, 4, rollout_logp=rollout)
    expected.backward()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), abs=1e-15)
    torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------------- overflow
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", TIS_MODES)
@pytest.mark.parametrize("level", TIS_LEVELS)
def test_overflowing_log_ratios_give_finite_weights_loss_and_gradient(level, mode, dtype, backend):
    # Sequence 0: Δ = 100 on each of 10 tokens: e^1000 overflows float64 (and e^100 float32); sequence 1 is fine.
    T0, T1 = 10, 6
    logp = -torch.linspace(0.1, 2.0, T0 + T1, dtype=torch.float64)
    old = logp - 1e-3
    rollout = old - torch.cat([torch.full((T0,), 100.0), torch.full((T1,), 0.05)]).double()
    mask = torch.ones(T0 + T1, dtype=torch.float64)
    cu = torch.tensor([0, T0, T0 + T1], dtype=torch.int32)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    cfg = LossConfig(name="luspo", use_tis=True, tis_level=level, tis_mode=mode, tis_clip=2.0)
    x = logp.to(dtype, copy=True).requires_grad_(True)
    loss, m = policy_loss(x, old.to(dtype), adv.to(dtype), mask, cu, cfg, 2, rollout_logp=rollout.to(dtype))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert all(math.isfinite(v) for v in m.values())
    assert m["tis_ratio_max"] == pytest.approx(math.exp(80.0), rel=1e-6)  # log ρ clamped at 80 before exp
    frac = m["tis_truncated_frac" if mode == "truncate" else "tis_masked_frac"]
    assert frac == (T0 / (T0 + T1) if level == "token" else 0.5)
    # The float64 oracle (exp may be inf there; min(inf, C) = C and inf ∉ [lo, C]) agrees.
    expected = naive_policy_loss(logp, old, adv, mask, cu.tolist(), name="luspo", eps_lo=cfg.eps_clip,
                                 eps_hi=cfg.eps_clip_high, agg=cfg.agg, num_sequences=2, tis=level, tis_clip=2.0,
                                 rollout=rollout, tis_mode=mode, tis_lower=cfg.tis_lower)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert float(loss.detach()) == pytest.approx(float(expected), rel=tol, abs=tol)


def test_tis_config_names_and_defaults():
    assert TIS_LEVELS == ("token", "sequence", "geometric") and TIS_MODES == ("truncate", "mask")
    assert LossConfig(use_tis=True, tis_mode="mask", tis_clip=4.0).tis_lower == 0.25  # 1/C
    assert LossConfig(use_tis=True, tis_mode="mask", tis_clip=4.0, tis_lower=0.5).tis_lower == 0.5
    assert LossConfig(use_tis=True, tis_clip=4.0).tis_lower is None  # truncate has no lower bound
