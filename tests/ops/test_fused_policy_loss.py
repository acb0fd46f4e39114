"""The csrc extension behind policy_loss: equal to the pure-PyTorch reference and to the naive float64
oracle for every loss and option (forward, backward, metrics), gradcheck through the custom op, bit
determinism, padding / empty sequences, dtypes, both backward modes, torch.compile and bad input."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from luspo_megatron.algorithms.losses import LossConfig, policy_loss
from luspo_megatron.ops import PolicyLossSpec, backend, fused_available, seq_policy_loss
from luspo_megatron.ops._extension import _has_cuda_kernels
from luspo_megatron.ops.fused_policy_loss import TABLE_COLUMNS
from tests.algorithms.naive import naive_policy_loss
from tests.algorithms.packed import CASES, OPTIONS, random_packed_batch
from tests.ops.batches import long_batch, on, with_empty_sequences

TOL = 1e-10
# The checks that hold as written on any device run on the CUDA kernels too, where a GPU is present.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() and _has_cuda_kernels()), reason="needs a GPU and a CUDA build of csrc/"))]

CASE_IDS = [f"{n}-{a}" if a else n for n, a in CASES]


@pytest.fixture
def use_backend(monkeypatch):
    """Select the extension ("cpp") or the reference for the calls that follow, and check the selection for
    CPU tensors (``backend()`` names the machine's best backend: "cuda" on a GPU machine with CUDA kernels)."""

    def select(name: str) -> None:
        if name == "reference":
            monkeypatch.setenv("LUSPO_FORCE_REFERENCE", "1")
        else:
            monkeypatch.delenv("LUSPO_FORCE_REFERENCE", raising=False)
        assert fused_available(torch.device("cpu")) == (name == "cpp")
        assert (backend() == "reference") == (name == "reference")

    return select


def _run(batch, cfg, adv, B, N=None):
    logp = batch.fresh_logp()
    loss, metrics = policy_loss(
        logp, batch.old_logp, adv, batch.loss_mask, batch.cu_seqlens, cfg, num_sequences=B, num_tokens=N,
        rollout_logp=batch.rollout_logp, ref_logp=batch.ref_logp, entropy=batch.entropy,
    )
    loss.backward()
    return loss.detach(), logp.grad, metrics


def _oracle(batch, cfg, adv, B, N=None):
    logp = batch.fresh_logp()
    cu = batch.cu_seqlens.tolist()
    # L_max: the configured one, else the longest response of the call (computed here, from the lengths).
    longest = max([float(batch.loss_mask[a:b].sum()) for a, b in zip(cu, cu[1:])] + [1.0])
    loss = naive_policy_loss(
        logp, batch.old_logp, adv, batch.loss_mask, batch.cu_seqlens.tolist(),
        name=cfg.name, eps_lo=cfg.eps_clip, eps_hi=cfg.eps_clip_high, agg=cfg.agg,
        num_sequences=B, num_tokens=N, max_len=cfg.max_response_len or longest,
        kl_coef=cfg.kl_coef, kl_type=cfg.kl_type, ref=batch.ref_logp,
        entropy_coef=cfg.entropy_coef, entropy=batch.entropy,
        tis=cfg.tis_level if cfg.use_tis else None, tis_clip=cfg.tis_clip, rollout=batch.rollout_logp,
        tis_mode=cfg.tis_mode, tis_lower=cfg.tis_lower,
    )
    if not loss.requires_grad:  # no response token in the batch: the oracle's sum never touched logp
        return loss.detach(), torch.zeros_like(logp)
    loss.backward()
    return loss.detach(), logp.grad


def _assert_metrics_equal(got: dict, expected: dict, tol: float = TOL) -> None:
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=tol, abs=tol), key


def test_extension_is_built_and_selected_for_cpu_tensors(use_backend):
    use_backend("cpp")
    assert torch.ops.luspo.seq_policy_loss_phase2 is not None


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("name,agg", CASES, ids=CASE_IDS)
def test_extension_equals_reference_and_naive_oracle(name, agg, option, use_backend):
    gen = torch.Generator().manual_seed(zlib.crc32(f"ext-{name}-{agg}-{option}".encode()))
    cfg = LossConfig(name=name, agg=agg, max_response_len=64 if trial_uses_fixed_len(option) else None,
                     **OPTIONS[option])
    clipped_seen = 0
    for trial in range(2):
        batch = random_packed_batch(gen, num_seqs=int(torch.randint(1, 9, (1,), generator=gen)),
                                    ratio_noise=0.3 if name == "grpo" else 1e-2, trailing_pad=3 * trial)
        batch = with_empty_sequences(batch, gen, count=1 + trial)
        adv = batch.adv_tok if (name in ("grpo", "gspo_token") and trial % 2) else batch.adv_seq
        B, N = batch.num_seqs + 3, (float(batch.loss_mask.sum()) + 7.0 if trial == 0 else None)

        use_backend("cpp")
        loss, grad, metrics = _run(batch, cfg, adv, B, N)
        use_backend("reference")
        ref_loss, ref_grad, ref_metrics = _run(batch, cfg, adv, B, N)
        naive_loss, naive_grad = _oracle(batch, cfg, adv, B, N)

        assert loss.dtype == torch.float64 and torch.isfinite(grad).all()
        assert abs(float(loss) - float(naive_loss)) <= TOL * max(1.0, abs(float(naive_loss)))
        torch.testing.assert_close(grad, naive_grad, rtol=0, atol=TOL)
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=TOL)
        assert abs(float(loss) - float(ref_loss)) <= TOL * max(1.0, abs(float(ref_loss)))
        _assert_metrics_equal(metrics, ref_metrics)
        clipped_seen += metrics["num_clipped"] > 0
    if option == "plain":
        assert clipped_seen > 0, "the random batches never exercised the clipped branch"


def trial_uses_fixed_len(option: str) -> bool:
    # seq-mean-token-sum-norm: a fixed L_max for some options, this call's longest response for the others.
    return option in ("plain", "tis_token", "kl_k1", "entropy")


LONG_OPTIONS = {
    "everything": OPTIONS["everything"],
    "tis_geometric_kl": {"use_tis": True, "tis_level": "geometric", "tis_clip": 1.2, "kl_coef": 0.05, "kl_type": "k2"},
    # Σ_t Δ_t over responses of up to 2000 tokens reaches |log ρ| ≈ 30: sequences are masked on both sides.
    "mis_sequence_kl": {"use_tis": True, "tis_level": "sequence", "tis_mode": "mask", "tis_clip": 1e6,
                        "kl_coef": 0.05, "kl_type": "k1"},
    "mis_token": {"use_tis": True, "tis_level": "token", "tis_mode": "mask", "tis_clip": 1.3, "tis_lower": 0.8},
}


@pytest.mark.parametrize("option", list(LONG_OPTIONS))
@pytest.mark.parametrize("name,agg", CASES, ids=CASE_IDS)
def test_extension_equals_reference_on_1e5_tokens(name, agg, option, use_backend):
    gen = torch.Generator().manual_seed(zlib.crc32(f"long-{name}-{agg}-{option}".encode()))
    cfg = LossConfig(name=name, agg=agg, **LONG_OPTIONS[option])
    batch = long_batch(gen, total_tokens=100_000, max_response=2000, ratio_noise=0.3 if name == "grpo" else 1e-2)
    assert batch.logp.numel() > 80_000 and (batch.cu_seqlens.diff() == 0).any()
    use_backend("cpp")
    loss, grad, metrics = _run(batch, cfg, batch.adv_seq, batch.num_seqs)
    use_backend("reference")
    ref_loss, ref_grad, ref_metrics = _run(batch, cfg, batch.adv_seq, batch.num_seqs)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-9 * float(ref_grad.abs().max()))
    _assert_metrics_equal(metrics, ref_metrics, tol=1e-9)
    assert metrics["num_clipped"] > 0


def _spec(name, agg=None, **kw) -> PolicyLossSpec:
    cfg = LossConfig(name=name, agg=agg)
    return PolicyLossSpec(loss=name, agg=cfg.agg, eps_lo=cfg.eps_clip, eps_hi=cfg.eps_clip_high, num_sequences=8, **kw)


@pytest.mark.parametrize("grad_mode", ["store", "recompute"])
@pytest.mark.parametrize(
    "extra",
    [{}, {"tis_level": "token", "tis_clip": 1.3}, {"tis_level": "sequence", "tis_clip": 1.3},
     {"tis_level": "geometric", "tis_clip": 1.01}, {"tis_level": "token", "tis_mode": "mask", "tis_clip": 1.3,
                                                    "tis_lower": 0.8},
     {"tis_level": "sequence", "tis_mode": "mask", "tis_clip": 1.5, "tis_lower": 0.7},
     {"kl_type": "k3", "kl_coef": 0.2}],
    ids=["plain", "tis_token", "tis_seq", "tis_geo", "mis_token", "mis_seq", "kl"],
)
@pytest.mark.parametrize("name,agg", CASES, ids=CASE_IDS)
def test_gradcheck_through_the_custom_op(name, agg, extra, grad_mode):
    if name == "gspo_token" and extra.get("tis_level") == "token":
        # GSPO-token's gradient is by construction not the derivative of its value (s_it = sg[s_i]·e^{logp−sg[logp]});
        # the two coincide only when every token of a sequence has the same weight (the other cases here).
        pytest.skip("gspo_token with token TIS has no finite-difference counterpart")
    gen = torch.Generator().manual_seed(zlib.crc32(f"gc-{name}-{agg}-{extra}".encode()))
    batch = random_packed_batch(gen, num_seqs=5, max_response=12, ratio_noise=0.3 if name == "grpo" else 1e-2,
                                trailing_pad=2)
    spec = _spec(name, agg, **extra)
    adv = batch.adv_tok if name == "grpo" else batch.adv_seq

    def loss_of(logp):
        return seq_policy_loss(logp, batch.old_logp, batch.loss_mask, batch.cu_seqlens, adv, spec,
                               rollout_logp=batch.rollout_logp, ref_logp=batch.ref_logp, grad_mode=grad_mode).loss

    assert torch.autograd.gradcheck(loss_of, (batch.fresh_logp(),), eps=1e-7, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("name", ["luspo", "grpo"])
def test_grad_output_scales_the_gradient_in_both_backward_modes(name):
    gen = torch.Generator().manual_seed(5)
    batch = random_packed_batch(gen, num_seqs=6, ratio_noise=0.3 if name == "grpo" else 1e-3)
    spec = _spec(name, kl_type="k3", kl_coef=0.1, tis_level="token", tis_clip=1.2)
    grads = {}
    for mode in ("store", "recompute"):
        for scale in (1.0, -2.5):
            logp = batch.fresh_logp()
            out = seq_policy_loss(logp, batch.old_logp, batch.loss_mask, batch.cu_seqlens, batch.adv_seq, spec,
                                  rollout_logp=batch.rollout_logp, ref_logp=batch.ref_logp, grad_mode=mode)
            (out.loss * scale).backward()
            grads[mode, scale] = logp.grad
    assert torch.equal(grads["store", 1.0], grads["recompute", 1.0])
    torch.testing.assert_close(grads["store", -2.5], -2.5 * grads["store", 1.0], rtol=1e-15, atol=0)
    torch.testing.assert_close(grads["recompute", -2.5], grads["store", -2.5], rtol=1e-15, atol=0)


@pytest.mark.parametrize("name,agg", [("luspo", None), ("grpo", "seq-mean-token-mean"), ("gspo_token", None)])
def test_same_inputs_give_bit_identical_outputs_for_any_thread_count(name, agg):
    gen = torch.Generator().manual_seed(9)
    batch = long_batch(gen, total_tokens=30_000, max_response=1500, ratio_noise=0.3 if name == "grpo" else 3e-3)
    spec = _spec(name, agg, tis_level="token", tis_clip=1.5, kl_type="k3", kl_coef=0.1)
    logp32 = batch.logp.float()
    inputs = [x.float() for x in (batch.old_logp, batch.loss_mask)]
    results = []
    threads = torch.get_num_threads()
    try:
        for num_threads in (1, 1, 2):
            torch.set_num_threads(num_threads)
            logp = logp32.clone().requires_grad_(True)
            out = seq_policy_loss(logp, *inputs, batch.cu_seqlens, batch.adv_seq, spec,
                                  rollout_logp=batch.rollout_logp.float(), ref_logp=batch.ref_logp.float())
            out.loss.backward()
            results.append((out.loss.detach(), out.table, out.sums, logp.grad))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_padding_masked_tokens_and_empty_sequences_give_zero_never_nan(device):
    # Garbage log-probs (inf, nan) on prompt tokens, masked EOS and trailing padding must not leak.
    cu = torch.tensor([0, 3, 3, 7, 7, 9], dtype=torch.int32, device=device)  # sequences 1 and 3 have no tokens
    # tokens 9, 10: padding, mask 1
    mask = torch.tensor([0, 1, 1, 0, 1, 0, 1, 1, 1, 1, 1], dtype=torch.float64, device=device)
    logp = torch.tensor([math.inf, -1.0, -0.5, math.nan, -0.7, -math.inf, -0.2, -0.3, -0.4, math.nan, math.inf],
                        dtype=torch.float64, device=device)
    old = torch.where(mask.bool() & torch.isfinite(logp), logp - 1e-3, torch.full_like(logp, -1.0))
    adv = torch.tensor([1.0, 2.0, -1.0, 3.0, 0.5], dtype=torch.float64, device=device)
    for name, agg in CASES:
        cfg = LossConfig(name=name, agg=agg)
        spec = PolicyLossSpec(loss=name, agg=cfg.agg, eps_lo=cfg.eps_clip, eps_hi=cfg.eps_clip_high, num_sequences=5,
                              kl_type="k3", kl_coef=0.1, tis_level="sequence", tis_clip=2.0, tis_mode="mask",
                              tis_lower=0.5)
        x = logp.clone().requires_grad_(True)
        out = seq_policy_loss(x, old, mask, cu, adv, spec, rollout_logp=old, ref_logp=old)
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(out.table).all() and torch.isfinite(x.grad).all()
        response = torch.tensor([0, 1, 1, 0, 1, 0, 1, 1, 1, 0, 0], dtype=torch.bool, device=device)
        assert (x.grad[~response] == 0).all()
        assert (out.table[[1, 3], : TABLE_COLUMNS.index("grad_abs") + 1] == 0).all()
        assert out.sums[:, 1].tolist() == [2.0, 0.0, 2.0, 0.0, 2.0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name", ["luspo", "grpo"])
def test_low_precision_inputs_accumulate_in_float32_and_match_the_reference(dtype, name, use_backend):
    gen = torch.Generator().manual_seed(3)
    batch = long_batch(gen, total_tokens=20_000, max_response=800, ratio_noise=0.3 if name == "grpo" else 1e-2)
    cfg = LossConfig(name=name, use_tis=True, kl_coef=0.1)
    args = [x.to(dtype) for x in (batch.old_logp, batch.rollout_logp, batch.ref_logp)]
    results = {}
    for which in ("cpp", "reference"):
        use_backend(which)
        logp = batch.logp.to(dtype).requires_grad_(True)
        loss, metrics = policy_loss(logp, args[0], batch.adv_seq, batch.loss_mask.bool(), batch.cu_seqlens, cfg,
                                    batch.num_seqs, rollout_logp=args[1], ref_logp=args[2])
        loss.backward()
        assert loss.dtype == torch.float32 and logp.grad.dtype == dtype
        results[which] = (float(loss.detach()), logp.grad.float(), metrics)
    assert results["cpp"][0] == pytest.approx(results["reference"][0], rel=1e-5, abs=1e-6)
    scale = float(results["reference"][1].abs().max())
    # One rounding of the gradient to the input dtype apart.
    ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 2**-22}[dtype]
    torch.testing.assert_close(results["cpp"][1], results["reference"][1], rtol=2 * ulp, atol=1e-6 * scale)
    for key in ("num_tokens", "clip_frac", "mean_abs_log_ratio", "tis_weight_mean", "kl"):
        assert results["cpp"][2][key] == pytest.approx(results["reference"][2][key], rel=1e-4, abs=1e-6), key


def test_mixed_input_dtypes_are_read_in_the_accumulation_dtype(use_backend):
    gen = torch.Generator().manual_seed(4)
    batch = random_packed_batch(gen, num_seqs=8, ratio_noise=1e-2)
    cfg = LossConfig(name="luspo", kl_coef=0.1)
    results = []
    for which in ("cpp", "reference"):
        use_backend(which)
        logp = batch.logp.float().requires_grad_(True)
        loss, _ = policy_loss(logp, batch.old_logp, batch.adv_seq, batch.loss_mask.long(), batch.cu_seqlens, cfg,
                              batch.num_seqs, ref_logp=batch.ref_logp.bfloat16())
        loss.backward()
        results.append((float(loss.detach()), logp.grad))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_custom_ops_pass_torch_library_opcheck(device):
    gen = torch.Generator().manual_seed(2)
    batch = on(random_packed_batch(gen, num_seqs=4, trailing_pad=2), device)
    for level, mode in (("sequence", "truncate"), ("token", "mask")):
        phase1_args = (batch.logp, batch.old_logp, batch.rollout_logp, batch.loss_mask, batch.cu_seqlens, "luspo",
                       level, mode, 2.0, 0.5)
        torch.library.opcheck(torch.ops.luspo.seq_logratio_phase1.default, phase1_args)
        sums = torch.ops.luspo.seq_logratio_phase1(*phase1_args)
        phase2_args = (batch.logp, batch.old_logp, batch.rollout_logp, batch.ref_logp, batch.loss_mask,
                       batch.cu_seqlens, batch.adv_seq, sums, "luspo", "seq-mean-token-sum", level, mode, "k3", 2e-3,
                       2.5e-3, 2.0, 0.5, 0.1, 4.0, -1.0, -1.0, True, None)
        torch.library.opcheck(torch.ops.luspo.seq_policy_loss_phase2.default, phase2_args)


def test_fused_loss_traces_under_torch_compile():
    gen = torch.Generator().manual_seed(8)
    batch = random_packed_batch(gen, num_seqs=6, ratio_noise=1e-2)
    spec = _spec("luspo", kl_type="k3", kl_coef=0.1)

    def loss_of(logp):
        return seq_policy_loss(logp, batch.old_logp, batch.loss_mask, batch.cu_seqlens, batch.adv_seq, spec,
                               ref_logp=batch.ref_logp).loss

    grads = []
    for fn in (loss_of, torch.compile(loss_of, backend="aot_eager", fullgraph=True)):
        logp = batch.fresh_logp()
        fn(logp).backward()
        grads.append(logp.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_bad_packed_input_gives_one_line_errors():
    gen = torch.Generator().manual_seed(1)
    batch = random_packed_batch(gen, num_seqs=3)
    spec = _spec("luspo")
    T = batch.logp.numel()
    bad = {
        "non-decreasing": torch.tensor([0, 5, 2, T], dtype=torch.int32),
        "cu[0] = 0": torch.tensor([1, 2, 3, T], dtype=torch.int32),
        "≤ T": torch.tensor([0, 1, 2, T + 1], dtype=torch.int32),
        "int32/int64": torch.tensor([0.0, 1.0, 2.0, T]),
    }
    for expected, cu in bad.items():
        with pytest.raises(ValueError, match="cu_seqlens") as info:
            seq_policy_loss(batch.logp, batch.old_logp, batch.loss_mask, cu, batch.adv_seq, spec)
        assert expected in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="grad_mode"):
        seq_policy_loss(batch.logp, batch.old_logp, batch.loss_mask, batch.cu_seqlens, batch.adv_seq, spec,
                        grad_mode="later")
    with pytest.raises(ValueError, match=r"advantages: expected \[3\] per sequence for luspo"):
        policy_loss(batch.logp, batch.old_logp, batch.adv_tok, batch.loss_mask, batch.cu_seqlens,
                    LossConfig(name="luspo"), 3)


def test_a_second_backward_through_the_same_graph_recomputes_the_gradient():
    gen = torch.Generator().manual_seed(12)
    batch = random_packed_batch(gen, num_seqs=4, ratio_noise=1e-3)
    spec = _spec("luspo", kl_type="k2", kl_coef=0.3)
    for mode in ("store", "recompute"):
        logp = batch.fresh_logp()
        out = seq_policy_loss(logp, batch.old_logp, batch.loss_mask, batch.cu_seqlens, batch.adv_seq, spec,
                              ref_logp=batch.ref_logp, grad_mode=mode)
        out.loss.backward(retain_graph=True)
        first = logp.grad.clone()
        (3.0 * out.loss).backward()
        torch.testing.assert_close(logp.grad, 4 * first, rtol=1e-15, atol=0)


@pytest.mark.parametrize("name,agg", CASES, ids=CASE_IDS)
def test_baseline_and_avx2_builds_of_the_cpu_kernels_agree(name, agg, monkeypatch):
    import luspo_megatron._C as ext

    gen = torch.Generator().manual_seed(zlib.crc32(f"isa-{name}-{agg}".encode()))
    batch = long_batch(gen, total_tokens=5_000, max_response=300, ratio_noise=0.3 if name == "grpo" else 1e-2)
    results = {}
    for isa in ("base", "default"):
        if isa == "base":
            monkeypatch.setenv("LUSPO_CPU_ISA", "base")
            assert ext.cpu_isa() == "base"
        else:
            monkeypatch.delenv("LUSPO_CPU_ISA")
        for extra in ({"tis_level": "token", "tis_clip": 1.5, "kl_type": "k3", "kl_coef": 0.1},
                      {"tis_level": "token", "tis_mode": "mask", "tis_clip": 1.3, "tis_lower": 0.8},
                      {"tis_level": "sequence", "tis_mode": "mask", "tis_clip": 3.0, "tis_lower": 0.3},
                      {"tis_level": "geometric", "tis_clip": 1.2, "kl_type": "k2", "kl_coef": 0.2}):
            spec = _spec(name, agg, **extra)
            logp = batch.fresh_logp()
            out = seq_policy_loss(logp, batch.old_logp, batch.loss_mask, batch.cu_seqlens, batch.adv_seq, spec,
                                  rollout_logp=batch.rollout_logp, ref_logp=batch.ref_logp)
            out.loss.backward()
            results[isa, str(extra)] = (out.loss.detach(), out.table, logp.grad)
    for key in {k for _, k in results}:
        for a, b in zip(results["base", key], results["default", key]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
