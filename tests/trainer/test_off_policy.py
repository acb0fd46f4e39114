"""Off-policy RL steps end to end (issue 14): tools/train_luspo.py with --num-steps-per-rollout 4,
--use-tis against the engine's log-probs, a KL reference model (offloaded between uses) and
--dump-step-tensors, for luspo, gspo and grpo; then a bf16 engine against the fp32 trainer.

The oracle: each optimizer step's logged loss (optimizer_steps.jsonl) is recomputed in float64 from
that step's dumped tensors (the current policy's log-probs before the update, π_old recomputed at
the start of the rollout, the engine's and the reference's log-probs, masks, advantages) with the
formulas of docs/design.md §2, written out below one sequence at a time; it shares no code with
luspo_megatron.algorithms. The same goes for the clip fraction, the KL and the mismatch metrics.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.trainer.test_train_luspo import ROOT, _env, rows, train

P, G, STEPS, N = 2, 4, 3, 4
OFF_POLICY = [
    "--rollout-batch-size", str(P), "--n-samples-per-prompt", str(G), "--rollout-max-response-len", "8",
    "--synthetic-num-prompts", "16", "--rollout-engine", "inprocess", "--weight-sync", "tensor",
    "--num-steps-per-rollout", str(N), "--use-tis", "--kl-loss-coef", "0.01", "--lr", "1e-3",
]
# gspo and luspo clip sequence ratios at 1 ± 3e-4 / 2e-3 (their defaults); grpo's 0.2 / 0.28 would need
# a larger lr to be reached on 2-sequence mini-batches, so it gets 0.05.
LOSS_FLAGS = {"luspo": [], "gspo": [], "grpo": ["--eps-clip", "0.05", "--eps-clip-high", "0.05"]}


def dumps(log_dir: Path, step: int) -> list[dict]:
    return [torch.load(log_dir / "dump" / f"step{step:04d}_opt{k}.pt", weights_only=False) for k in range(1, N + 1)]


def optimizer_rows(log_dir: Path) -> list[dict]:
    return rows(log_dir, "optimizer_steps.jsonl")


@pytest.fixture(scope="module", params=["luspo", "gspo", "grpo"])
def run(request, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp(request.param)
    train(log_dir, *OFF_POLICY, "--train-iters", str(STEPS), "--loss", request.param, *LOSS_FLAGS[request.param],
          "--ref-offload", "--dump-step-tensors", str(log_dir / "dump"))
    return request.param, log_dir


# ------------------------------------------------------------------------------------------ oracle
def oracle(dump: dict) -> dict[str, float]:
    """Loss, clip fraction, KL and TIS truncated fraction of one optimizer step, float64, from its dump."""
    cfg = dump["loss_config"]
    name, beta, C = cfg["name"], cfg["kl_coef"], cfg["tis_clip"]
    lo, hi = 1.0 - cfg["eps_clip"], 1.0 + cfg["eps_clip_high"]
    B, n_tokens = dump["num_sequences"], dump["num_tokens"]
    loss = clipped = counted = kl_sum = tokens = truncated = 0.0
    for mb in dump["micro_batches"]:
        cu = mb["cu_seqlens"].tolist()
        logp = mb["logp"].double().tolist()
        old = logp if mb["old_logp"] is None else mb["old_logp"].double().tolist()
        rollout, ref = mb["rollout_logp"].double().tolist(), mb["ref_logp"].double().tolist()
        mask, advantages = mb["loss_mask"].tolist(), mb["advantages"].double().tolist()
        for i in range(len(cu) - 1):
            t = [j for j in range(cu[i], cu[i + 1]) if mask[j] > 0]  # the response tokens of sequence i
            A = advantages[i]
            w = {j: min(math.exp(old[j] - rollout[j]), C) for j in t}  # token TIS, truncated at C
            kl = {j: math.exp(ref[j] - logp[j]) - (ref[j] - logp[j]) - 1.0 for j in t}  # k3
            kl_sum += sum(kl.values())
            tokens += len(t)
            truncated += sum(math.exp(old[j] - rollout[j]) > C for j in t)
            if name == "grpo":  # token ratios, token-mean over the step's N response tokens
                for j in t:
                    r = math.exp(logp[j] - old[j])
                    loss += (w[j] * -min(r * A, min(max(r, lo), hi) * A) + beta * kl[j]) / n_tokens
                    clipped += (A > 0 and r > hi) or (A < 0 and r < lo)
                    counted += 1
                continue
            s = math.exp(sum(logp[j] - old[j] for j in t) / len(t))  # GSPO's geometric-mean ratio
            ell = -min(s * A, min(max(s, lo), hi) * A)
            per_sequence = sum(w[j] * ell + beta * kl[j] for j in t)
            loss += per_sequence / B if name == "luspo" else per_sequence / (len(t) * B)  # |y_i|·ℓ_i vs ℓ_i
            clipped += (A > 0 and s > hi) or (A < 0 and s < lo)
            counted += 1
    return {"loss": loss, "clip_frac": clipped / counted, "kl": kl_sum / tokens,
            "tis_truncated_frac": truncated / tokens}


# ------------------------------------------------------------------------------------------- tests
def test_every_optimizer_steps_logged_loss_equals_a_float64_recomputation_from_its_tensors(run):
    loss, log_dir = run
    logged = optimizer_rows(log_dir)
    assert [(r["step"], r["optimizer_step"]) for r in logged] == [(s, k) for s in range(1, STEPS + 1)
                                                                 for k in range(1, N + 1)]
    for row in logged:
        dump = dumps(log_dir, row["step"])[row["optimizer_step"] - 1]
        assert dump["loss_config"]["name"] == loss and dump["num_sequences"] == P * G // N
        want = oracle(dump)
        where = (row["step"], row["optimizer_step"])
        assert row["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6), where
        assert row["clip_frac"] == pytest.approx(want["clip_frac"], abs=1e-12), where
        assert row["kl"] == pytest.approx(want["kl"], rel=1e-5, abs=1e-9), where  # the logged KL, recomputed
        assert row["tis_truncated_frac"] == pytest.approx(want["tis_truncated_frac"], abs=1e-12), where
    assert any(abs(r["loss"]) > 1e-2 for r in logged)  # not vacuous


def test_the_ratio_moves_off_policy_and_every_rollout_runs_its_four_optimizer_steps(run):
    _, log_dir = run
    logged = optimizer_rows(log_dir)
    for row in logged:
        if row["optimizer_step"] == 1:  # π_θ = π_old before the first update: ratio exactly 1
            assert row["mean_abs_log_ratio"] == 0.0 and row["clip_frac"] == 0.0
        else:
            assert row["mean_abs_log_ratio"] > 0
    assert all(r["clip_frac"] > 0 for r in logged if r["optimizer_step"] == N)  # clipped by the last mini-batch
    for row in rows(log_dir):
        assert row["optimizer_steps"] == N and row["skipped_steps"] == 0 and row["num_seqs"] == P * G
        assert row["clip_frac_last"] == logged[N * row["step"] - 1]["clip_frac"]
        assert row["tis_ratio_max"] == max(r["tis_ratio_max"] for r in logged if r["step"] == row["step"])


def test_the_offloaded_reference_is_exactly_the_on_device_policy_rl_started_from(run):
    # Step 1 computes π_old and ref_logp of all N mini-batches before its first update: the policy (on the
    # device) and the reference (offloaded, copied back for each of its N forward passes) hold the same
    # weights then, and must give the same log-probs bit for bit.
    _, log_dir = run
    for dump in dumps(log_dir, 1):
        assert all(torch.equal(mb["ref_logp"], mb["old_logp"]) for mb in dump["micro_batches"])
    later = dumps(log_dir, STEPS)[-1]["micro_batches"]
    assert any(not torch.equal(mb["ref_logp"], mb["logp"]) for mb in later)


def mismatch_oracle(step_dumps: list[dict]) -> dict[str, float]:
    """k3, mean |Δ| and the largest sequence ratio between π_old and the engine over a rollout, float64."""
    k3 = abs_sum = n = 0.0
    seq_max = -math.inf
    for dump in step_dumps:
        for mb in dump["micro_batches"]:
            old = mb["logp"] if mb["old_logp"] is None else mb["old_logp"]
            delta = (old.double() - mb["rollout_logp"].double()) * mb["loss_mask"].double()
            cu = mb["cu_seqlens"].tolist()
            for i in range(len(cu) - 1):
                d = [float(x) for x, m in zip(delta[cu[i]:cu[i + 1]], mb["loss_mask"][cu[i]:cu[i + 1]]) if m > 0]
                k3 += sum(math.exp(x) - 1 - x for x in d)
                abs_sum += sum(abs(x) for x in d)
                n += len(d)
                seq_max = max(seq_max, sum(d))
    return {"mismatch_k3_kl": k3 / n, "mismatch_abs_logp_diff": abs_sum / n,
            "mismatch_seq_ratio_max": math.exp(seq_max)}


def test_mismatch_metrics_equal_a_recomputation_and_are_zero_against_the_fp32_in_process_engine(run):
    _, log_dir = run
    for row in rows(log_dir):
        want = mismatch_oracle(dumps(log_dir, row["step"]))
        assert row["mismatch_num_tokens"] == row["num_tokens"]
        for key, value in want.items():
            assert row[key] == pytest.approx(value, rel=1e-9, abs=1e-15), (row["step"], key)
        # The engine runs the synced fp32 weights: the same policy, up to float32 kernel differences.
        assert row["mismatch_abs_logp_diff"] < 1e-5 and row["mismatch_k3_kl"] < 1e-10


@pytest.mark.slow  # ≈ 15 s (45 s on a busy machine); the fast check is the test above
def test_the_offloaded_reference_gives_the_run_without_offload_exactly(run, tmp_path):
    loss, log_dir = run
    if loss != "luspo":
        pytest.skip("one comparison run is enough")
    train(tmp_path, *OFF_POLICY, "--train-iters", "1", "--loss", loss, "--dump-step-tensors", str(tmp_path / "dump"))
    offloaded, kept = optimizer_rows(log_dir)[:N], optimizer_rows(tmp_path)
    for a, b in zip(offloaded, kept, strict=True):
        for key in ("loss", "kl", "grad_norm", "clip_frac"):
            assert a[key] == b[key], key
    for a, b in zip(dumps(log_dir, 1), dumps(tmp_path, 1)):
        assert all(torch.equal(x["ref_logp"], y["ref_logp"]) for x, y in zip(a["micro_batches"], b["micro_batches"]))


# ---------------------------------------------------------------- a bf16 engine against fp32 training
@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """On-policy (one optimizer step: π_old exists only inside the loss), masked IS at token level."""
    log_dir = tmp_path_factory.mktemp("bf16")
    train(log_dir, *OFF_POLICY, "--num-steps-per-rollout", "1", "--kl-loss-coef", "0", "--train-iters", "1",
          "--rollout-dtype", "bfloat16", "--tis-mode", "mask", "--tis-clip", "1.001", "--loss", "luspo",
          "--dump-step-tensors", str(log_dir / "dump"))
    return log_dir


def test_mismatch_metrics_are_positive_against_a_bf16_engine_and_equal_a_recomputation(bf16_run):
    (row,) = rows(bf16_run)
    dump = torch.load(bf16_run / "dump" / "step0001_opt1.pt", weights_only=False)
    assert all(mb["old_logp"] is None for mb in dump["micro_batches"])  # on-policy: measured inside the loss
    want = mismatch_oracle([dump])
    for key, value in want.items():
        assert row[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
    # bf16 ≠ fp32: 100 times the fp32 engine's bound, and far above its ≈ 2e-7
    assert row["mismatch_abs_logp_diff"] > 1e-4 and row["mismatch_k3_kl"] > 1e-9


def test_masked_importance_sampling_drops_the_tokens_outside_its_bounds_in_the_trainer(bf16_run):
    (row,) = rows(bf16_run)
    dump = torch.load(bf16_run / "dump" / "step0001_opt1.pt", weights_only=False)
    C = 1.001  # |Δlogp| ≈ 1e-3 between bf16 and fp32 on this tiny model: about half the tokens leave [1/C, C]
    terms = masked = 0
    loss = 0.0
    for mb in dump["micro_batches"]:  # on-policy: ratio 1, nothing clipped; LUSPO (1/B) Σ_i Σ_t m_t w_t ℓ_i
        cu = mb["cu_seqlens"].tolist()
        for i in range(len(cu) - 1):
            t = [j for j in range(cu[i], cu[i + 1]) if mb["loss_mask"][j] > 0]
            rho = [math.exp(float(mb["logp"][j]) - float(mb["rollout_logp"][j])) for j in t]
            w = [r if 1 / C <= r <= C else 0.0 for r in rho]  # MIS / IcePop: masked outside [1/C, C]
            terms, masked = terms + len(t), masked + sum(x == 0.0 for x in w)
            loss += sum(w) * -float(mb["advantages"][i]) / dump["num_sequences"]
    assert 0 < masked < terms
    assert row["tis_masked_frac"] == pytest.approx(masked / terms, abs=1e-12)
    assert row["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------------------------- the flags
def test_num_steps_per_rollout_and_a_disagreeing_global_batch_size_is_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "train_luspo.py"), "--rollout-batch-size", "4",
                           "--n-samples-per-prompt", "4", "--num-steps-per-rollout", "4", "--global-batch-size", "8"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "--global-batch-size" in line and "--num-steps-per-rollout" in line and "16" in line, line


def test_optimizer_steps_log_is_json_lines_with_one_row_per_step(run):
    _, log_dir = run
    lines = (log_dir / "optimizer_steps.jsonl").read_text().splitlines()
    assert len(lines) == STEPS * N and all(json.loads(line)["lr"] == 1e-3 for line in lines)


def test_reference_offload_frees_the_device_storage_between_uses_and_restores_it_bit_for_bit():
    from luspo_megatron.parallel.policy import ReferenceOffload

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 6))
    model[1].weight = model[0].weight.__class__(model[0].weight.data.t().contiguous())  # its own storage
    stacked = torch.randn(2, 3, 4)  # two parameters that are views of one buffer (as grouped experts are)
    model.a, model.b = torch.nn.Parameter(stacked[0]), torch.nn.Parameter(stacked[1])
    model.b.data = model.a.data.new_empty(0).set_(model.a.untyped_storage(), 12, (3, 4))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    x = torch.randn(7, 6)
    expected = model(x)
    offload = ReferenceOffload([model])
    assert not offload.on_device and all(p.untyped_storage().nbytes() == 0 for p in model.parameters())
    for _ in range(2):
        offload.load()
        assert offload.on_device
        assert all(torch.equal(p, before[k]) for k, p in model.named_parameters())
        assert model.b.untyped_storage().data_ptr() == model.a.untyped_storage().data_ptr()  # still one buffer
        assert torch.equal(model(x), expected)
        offload.offload()
        assert all(p.untyped_storage().nbytes() == 0 for p in model.parameters())


@pytest.mark.parametrize("raw,needle", [
    ({"optimizer": {"num_steps_per_rollout": 3}}, "--num-steps-per-rollout: expected a divisor of the rollout batch"),
    ({"optimizer": {"num_steps_per_rollout": 2, "global_batch_size": 16}}, "--global-batch-size 16 and "),
    ({"algorithm": {"overlong_buffer_len": 65}}, "--overlong-buffer-len: expected ≤ --rollout-max-response-len"),
    ({"algorithm": {"over_sampling_batch_size": 0}}, "--over-sampling-batch-size: expected a positive integer"),
    ({"algorithm": {"overlong_penalty_factor": -1.0}}, "--overlong-penalty-factor: expected ≥ 0"),
    ({"rollout": {"local_dtype": "bfloat16"}}, "--rollout-dtype: expected float32 unless --rollout-engine inprocess"),
])
def test_bad_off_policy_and_dapo_settings_are_one_line_config_errors(raw, needle):
    from luspo_megatron.config import config_from_dict
    from luspo_megatron.errors import ConfigError

    with pytest.raises(ConfigError) as err:  # rollout batch: 8 prompts × 8 samples = 64
        config_from_dict(raw)
    assert needle in str(err.value) and "\n" not in str(err.value)
    ok = config_from_dict({"optimizer": {"num_steps_per_rollout": 4, "global_batch_size": 16}})
    assert ok.optimizer_steps_per_rollout == 4
    assert config_from_dict({"optimizer": {"global_batch_size": 16}}).optimizer_steps_per_rollout == 4
