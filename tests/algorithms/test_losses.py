"""policy_loss against the naive float64 oracle, micro-batch invariance, GSPO-token ≡ GSPO, the
|y_i|² pitfall, empty sequences, dtypes and hand-computed metrics (docs/design.md §2)."""

from __future__ import annotations

import itertools
import math
import zlib

import pytest
import torch

from luspo_megatron.algorithms.losses import LOSS_NAMES, LossConfig, policy_loss
from luspo_megatron.errors import ConfigError
from tests.algorithms.naive import naive_policy_loss
from tests.algorithms.packed import CASES, OPTIONS, random_packed_batch

TOL = 1e-10



def _call(batch, cfg, logp, adv, num_sequences, num_tokens=None, cu=None, sl=slice(None)):
    return policy_loss(
        logp, batch.old_logp[sl], adv, batch.loss_mask[sl], batch.cu_seqlens if cu is None else cu, cfg,
        num_sequences=num_sequences, num_tokens=num_tokens,
        rollout_logp=batch.rollout_logp[sl], ref_logp=batch.ref_logp[sl], entropy=batch.entropy[sl],
    )


def _oracle(batch, cfg, logp, adv, num_sequences, num_tokens=None):
    return naive_policy_loss(
        logp, batch.old_logp, adv, batch.loss_mask, batch.cu_seqlens.tolist(),
        name=cfg.name, eps_lo=cfg.eps_clip, eps_hi=cfg.eps_clip_high, agg=cfg.agg,
        num_sequences=num_sequences, num_tokens=num_tokens, max_len=cfg.max_response_len,
        kl_coef=cfg.kl_coef, kl_type=cfg.kl_type, ref=batch.ref_logp,
        entropy_coef=cfg.entropy_coef, entropy=batch.entropy,
        tis=cfg.tis_level if cfg.use_tis else None, tis_clip=cfg.tis_clip, rollout=batch.rollout_logp,
        tis_mode=cfg.tis_mode, tis_lower=cfg.tis_lower,
    )


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("name,agg", CASES, ids=[f"{n}-{a}" if a else n for n, a in CASES])
def test_policy_loss_and_grad_equal_naive_oracle(name, agg, option):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}-{agg}-{option}".encode()))
    cfg = LossConfig(name=name, agg=agg, max_response_len=64, **OPTIONS[option])
    clipped_seen = 0
    tis_fracs = []
    for trial in range(4):
        batch = random_packed_batch(gen, num_seqs=int(torch.randint(1, 9, (1,), generator=gen)),
                                    ratio_noise=0.3 if name == "grpo" else 1e-2, trailing_pad=trial % 2 * 3)
        adv = batch.adv_tok if (name in ("grpo", "gspo_token") and trial % 2) else batch.adv_seq
        # B and N deliberately not the local counts: they are the global normalisers of a larger step.
        B = batch.num_seqs + 3
        N = float(batch.loss_mask.sum()) + 7.0

        logp = batch.fresh_logp()
        loss, metrics = _call(batch, cfg, logp, adv, B, N)
        loss.backward()
        ref_logp = batch.fresh_logp()
        expected = _oracle(batch, cfg, ref_logp, adv, B, N)
        expected.backward()

        assert loss.dtype == torch.float64
        assert abs(float(loss.detach()) - float(expected.detach())) <= TOL * max(1.0, abs(float(expected.detach())))
        torch.testing.assert_close(logp.grad, ref_logp.grad, rtol=0, atol=TOL)
        assert metrics["loss"] == pytest.approx(float(loss.detach()), abs=1e-12)
        clipped_seen += metrics["num_clipped"] > 0
        if cfg.use_tis:
            tis_fracs.append(metrics["tis_masked_frac" if cfg.tis_mode == "mask" else "tis_truncated_frac"])
    if option == "plain":
        assert clipped_seen > 0, "the random batches never exercised the clipped branch"
    if cfg.use_tis:  # the bounds cut: some terms were truncated / masked, some were kept
        assert 0 < max(tis_fracs) and min(tis_fracs) < 1, tis_fracs


@pytest.mark.parametrize("name,agg", CASES, ids=[f"{n}-{a}" if a else n for n, a in CASES])
@pytest.mark.parametrize("num_micro", [2, 3, 5])
def test_micro_batch_split_sums_to_full_batch_loss_and_grad(name, agg, num_micro):
    gen = torch.Generator().manual_seed(7 * num_micro)
    level = ("token", "sequence", "geometric")[num_micro % 3]
    cfg = LossConfig(name=name, agg=agg, max_response_len=50, use_tis=True, tis_level=level,
                     tis_mode="mask" if num_micro == 3 else "truncate", kl_coef=0.05, entropy_coef=0.01)
    batch = random_packed_batch(gen, num_seqs=10, ratio_noise=3e-3)
    B, N = batch.num_seqs, float(batch.loss_mask.sum())

    full_logp = batch.fresh_logp()
    full, _ = _call(batch, cfg, full_logp, batch.adv_seq, B, N)
    full.backward()

    split_logp = batch.fresh_logp()
    total = 0.0
    bounds = torch.linspace(0, B, num_micro + 1).round().long().tolist()
    for lo, hi in itertools.pairwise(bounds):
        t0, t1 = int(batch.cu_seqlens[lo]), int(batch.cu_seqlens[hi])
        cu = batch.cu_seqlens[lo:hi + 1] - t0
        part, _ = _call(batch, cfg, split_logp[t0:t1], batch.adv_seq[lo:hi], B, N, cu=cu, sl=slice(t0, t1))
        total = total + part
    total.backward()
    assert abs(float(total.detach()) - float(full.detach())) <= TOL
    torch.testing.assert_close(split_logp.grad, full_logp.grad, rtol=0, atol=TOL)


@pytest.mark.parametrize("option", ["plain", "tis_sequence", "tis_geometric", "mis_sequence", "kl_k3"])
def test_gspo_token_equals_gspo_with_per_sequence_advantages(option):
    gen = torch.Generator().manual_seed(11)
    for _ in range(5):
        batch = random_packed_batch(gen, num_seqs=6, ratio_noise=3e-3)
        seg_len = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()
        adv_tok = batch.adv_seq.repeat_interleave(seg_len)  # constant within each sequence
        results = []
        for name, adv in (("gspo", batch.adv_seq), ("gspo_token", adv_tok)):
            logp = batch.fresh_logp()
            loss, _ = _call(batch, LossConfig(name=name, **OPTIONS[option]), logp, adv, batch.num_seqs)
            loss.backward()
            results.append((loss.detach(), logp.grad))
        torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=TOL)
        torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=TOL)


def _single_sequence_batches(lengths):
    """On-policy batch (old = logp), Â = 1 for every sequence, lengths as given (all response)."""
    total = sum(lengths)
    logp = torch.linspace(-2.0, -0.5, total, dtype=torch.float64)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    return logp, torch.ones(total, dtype=torch.float64), cu


@pytest.mark.parametrize("option", ["kl_k3", "tis_token", "mis_token", "entropy", "everything"])
def test_luspo_weights_sequences_by_length_not_length_squared(option):
    """With any token-level term present, LUSPO must stay (1/B) Σ_i Σ_t m_t (ℓ_i + token terms):
    per-token policy gradient −s_i·Â_i/B for every length, and token terms summed once per token."""
    lengths = [1, 4, 9, 16]
    logp0, mask, cu = _single_sequence_batches(lengths)
    B = len(lengths)
    cfg = LossConfig(name="luspo", **OPTIONS[option])
    logp = logp0.clone().requires_grad_(True)
    rollout = logp0.detach().clone()  # on-policy engine: TIS weights are exactly 1
    ref = logp0 - 0.1
    entropy = torch.full_like(logp0, 0.7)
    loss, _ = policy_loss(logp, logp0.detach(), torch.ones(B, dtype=torch.float64), mask, cu, cfg, B,
                          rollout_logp=rollout, ref_logp=ref, entropy=entropy)
    loss.backward()

    kl_t = {"k1": 0.1, "k2": 0.005, "k3": math.exp(-0.1) - (-0.1) - 1}[cfg.kl_type] if cfg.kl_coef else 0.0
    token_term = cfg.kl_coef * kl_t - cfg.entropy_coef * 0.7
    # ℓ_i = −1 on-policy with Â = 1; Σ_t over |y_i| tokens; / B.  The |y|² bug would give Σ_i |y_i|² (...)
    expected = sum(L * (-1.0 + token_term) for L in lengths) / B
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-12)
    dkl = {"k1": 1.0, "k2": 0.1, "k3": 1 - math.exp(-0.1)}[cfg.kl_type] if cfg.kl_coef else 0.0
    expected_grad = torch.full_like(logp0, (-1.0 + cfg.kl_coef * dkl) / B)  # same for every length
    torch.testing.assert_close(logp.grad, expected_grad, rtol=0, atol=1e-12)


def test_gspo_per_token_gradient_shrinks_as_one_over_length():
    lengths = [1, 4, 9, 16]
    logp0, mask, cu = _single_sequence_batches(lengths)
    logp = logp0.clone().requires_grad_(True)
    loss, _ = policy_loss(logp, logp0.detach(), torch.ones(4, dtype=torch.float64), mask, cu,
                          LossConfig(name="gspo"), 4)
    loss.backward()
    expected = torch.cat([torch.full((L,), -1.0 / (4 * L), dtype=torch.float64) for L in lengths])
    torch.testing.assert_close(logp.grad, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name,agg", CASES, ids=[f"{n}-{a}" if a else n for n, a in CASES])
def test_empty_sequences_give_zero_terms_and_no_nan(name, agg):
    # Sequence 1 is prompt-only, sequence 2 is a response that is only a masked-out EOS.
    mask = torch.tensor([0, 1, 1, 0, 0, 0, 0, 1, 1, 1], dtype=torch.float64)
    cu = torch.tensor([0, 3, 5, 6, 10], dtype=torch.int32)
    logp = torch.linspace(-1, -0.1, 10, dtype=torch.float64, requires_grad=True)
    old = logp.detach() - 1e-4
    cfg = LossConfig(name=name, agg=agg, use_tis=True, tis_level="sequence", kl_coef=0.1, entropy_coef=0.1)
    loss, metrics = policy_loss(logp, old, torch.tensor([1.0, -1.0, 2.0, 0.5], dtype=torch.float64), mask, cu,
                                cfg, 4, rollout_logp=old, ref_logp=old, entropy=torch.ones(10, dtype=torch.float64))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert (logp.grad[mask == 0] == 0).all()
    assert metrics["num_empty_seqs"] == 2.0
    assert all(math.isfinite(v) for v in metrics.values())
    # Dropping the two empty sequences (keeping B = 4) changes nothing.
    keep = torch.tensor([1, 1, 1, 0, 0, 0, 1, 1, 1, 1], dtype=torch.bool)
    loss2, _ = policy_loss(logp.detach()[keep], old[keep], torch.tensor([1.0, 0.5], dtype=torch.float64),
                           mask[keep], torch.tensor([0, 3, 7], dtype=torch.int32), cfg, 4, rollout_logp=old[keep],
                           ref_logp=old[keep], entropy=torch.ones(7, dtype=torch.float64))
    assert float(loss2) == pytest.approx(float(loss.detach()), abs=1e-14)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    gen = torch.Generator().manual_seed(3)
    batch = random_packed_batch(gen, num_seqs=8, ratio_noise=1e-1)
    cfg = LossConfig(name="luspo")
    logp, old, adv = (x.to(dtype) for x in (batch.logp, batch.old_logp, batch.adv_seq))
    logp.requires_grad_(True)
    loss, _ = policy_loss(logp, old, adv, batch.loss_mask, batch.cu_seqlens, cfg, batch.num_seqs)
    loss.backward()
    assert loss.dtype == torch.float32
    assert logp.grad.dtype == dtype
    # The oracle sees the same rounded inputs, in float64: only the accumulation precision differs.
    expected = naive_policy_loss(
        logp.detach().double(), old.double(), adv.double(), batch.loss_mask, batch.cu_seqlens.tolist(),
        name="luspo", eps_lo=cfg.eps_clip, eps_hi=cfg.eps_clip_high, agg=cfg.agg, num_sequences=batch.num_seqs,
    )
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)


def test_metrics_on_a_hand_computed_example():
    # Two sequences, ε = (0.15, 0.15) for round numbers.
    #   seq 0: 2 response tokens, δ = (0.3, 0.1) → s_0 = e^0.2 = 1.2214 > 1.15, Â = +1 → clipped
    #   seq 1: 1 response token,  δ = (−0.05)    → s_1 = e^−0.05 = 0.9512 in range, Â = +2 → not clipped
    logp = torch.tensor([-1.0, -0.7, -0.9, -2.0, -0.55], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([-1.0, -1.0, -1.0, -2.0, -0.50], dtype=torch.float64)
    mask = torch.tensor([0, 1, 1, 0, 1], dtype=torch.float64)
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    cfg = LossConfig(name="luspo", eps_clip=0.15, eps_clip_high=0.15)
    loss, m = policy_loss(logp, old, torch.tensor([1.0, 2.0], dtype=torch.float64), mask, cu, cfg, 2)
    s1 = math.exp(-0.05)
    # LUSPO: (1/B)(|y_0|·(−1.15·1) + |y_1|·(−s_1·2))
    assert float(loss.detach()) == pytest.approx((2 * -1.15 + 1 * -s1 * 2) / 2, abs=1e-12)
    assert m["clip_frac"] == 0.5 and m["num_clipped"] == 1.0
    assert m["mean_abs_log_ratio"] == pytest.approx((0.3 + 0.1 + 0.05) / 3, abs=1e-12)
    assert m["seq_ratio_mean"] == pytest.approx((math.exp(0.2) + s1) / 2, abs=1e-12)
    assert m["num_tokens"] == 3.0 and m["num_seqs"] == 2.0 and m["num_empty_seqs"] == 0.0
    # Only seq 1 carries gradient (seq 0 is clipped); it is the shorter one → length-weight share 0.
    assert m["length_weight_share"] == 0.0
    # GRPO, token-mean, same tokens: ratios e^0.3, e^0.1 (seq 0, Â=1) and e^−0.05 (seq 1, Â=2).
    _, g = policy_loss(logp, old, torch.tensor([1.0, 2.0], dtype=torch.float64), mask, cu,
                       LossConfig(name="grpo", eps_clip=0.15, eps_clip_high=0.15), 2)
    assert g["clip_frac"] == pytest.approx(1 / 3)  # only e^0.3 > 1.15 with Â > 0
    # Length-weight share: GRPO token-mean gives per-token weight r_t·Â/N to unclipped tokens:
    # seq 0 (longer): e^0.1·1/3; seq 1: e^−0.05·2/3.
    w0, w1 = math.exp(0.1) / 3, math.exp(-0.05) * 2 / 3
    assert g["length_weight_share"] == pytest.approx(w0 / (w0 + w1), abs=1e-12)


def test_metrics_kl_entropy_and_tis_are_masked_token_means():
    logp = torch.tensor([-1.0, -0.5, -0.25, -2.0], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([0, 1, 1, 1], dtype=torch.float64)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    ref = logp.detach() - torch.tensor([9.0, 0.1, 0.2, 0.3], dtype=torch.float64)
    rollout = logp.detach() - torch.tensor([0.0, 0.5, 1.0, -0.5], dtype=torch.float64)  # old = logp
    cfg = LossConfig(name="grpo", kl_coef=0.1, kl_type="k1", use_tis=True, tis_clip=2.0, entropy_coef=0.1)
    _, m = policy_loss(logp, logp.detach(), torch.ones(1, dtype=torch.float64), mask, cu, cfg, 1,
                       rollout_logp=rollout, ref_logp=ref, entropy=torch.tensor([5.0, 1.0, 2.0, 3.0]).double())
    assert m["kl"] == pytest.approx(0.2)
    assert m["entropy"] == pytest.approx(2.0)
    w = [math.exp(0.5), min(math.exp(1.0), 2.0), math.exp(-0.5)]
    assert m["tis_weight_mean"] == pytest.approx(sum(w) / 3)
    assert m["tis_truncated_frac"] == pytest.approx(1 / 3) and m["tis_masked_frac"] == 0.0
    assert m["tis_num_terms"] == 3.0 and m["tis_ratio_max"] == pytest.approx(math.exp(1.0))


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"name": "ppo"}, "loss"),
        ({"name": "luspo", "eps_clip": 1.5}, "eps_clip"),
        ({"name": "grpo", "eps_clip_high": -0.1}, "eps_clip_high"),
        ({"name": "grpo", "agg": "token-sum"}, "agg"),
        ({"name": "luspo", "agg": "token-mean"}, "agg"),
        ({"name": "grpo", "kl_type": "k4"}, "kl_type"),
        ({"name": "grpo", "tis_level": "segment"}, "tis_level"),
        ({"name": "grpo", "tis_clip": 0.0}, "tis_clip"),
        ({"name": "grpo", "tis_mode": "clip"}, "tis_mode"),
        ({"name": "grpo", "tis_mode": "mask", "tis_clip": 2.0, "tis_lower": 2.0}, "tis_lower"),
        ({"name": "grpo", "tis_mode": "mask", "tis_clip": 2.0, "tis_lower": 0.0}, "tis_lower"),
        ({"name": "grpo", "tis_mode": "mask", "tis_clip": 0.5}, "tis_lower"),  # default lo = 1/C = 2 > C
        ({"name": "grpo", "kl_coef": -1.0}, "kl_coef"),
    ],
)
def test_bad_loss_config_gives_one_line_error_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError) as info:
        LossConfig(**kwargs)
    assert info.value.field == field
    assert field in str(info.value) and "\n" not in str(info.value)


def test_loss_config_defaults_follow_design_and_are_frozen():
    expected = {"grpo": (0.2, 0.28), "gspo": (3e-4, 4e-4), "gspo_token": (3e-4, 4e-4), "luspo": (2e-3, 2.5e-3)}
    for name in LOSS_NAMES:
        cfg = LossConfig(name=name)
        assert (cfg.eps_clip, cfg.eps_clip_high) == expected[name]
        assert cfg.kl_coef == 0.0
    assert LossConfig(name="grpo", eps_clip=0.1).eps_clip_high == 0.1  # symmetric when only ε_lo is given
    with pytest.raises(AttributeError):
        LossConfig().eps_clip = 0.5
