"""The main job end to end (tools/train_luspo.py): real Megatron policy, real rollout server over
HTTP, real reward pool, real checkpoints, one process and 2-process torchrun.

The oracle: with one optimizer step per rollout every step is on-policy, so s_i = r_t = 1 exactly
and nothing is clipped. The logged loss is then a closed form of the rollout alone:

    luspo   −(1/B) Σ_i |y_i| Â_i
    gspo    −(1/B) Σ_i Â_i           (= 0: group-normalised advantages sum to 0 per group)
    grpo    −Σ_i |y_i| Â_i / Σ_i |y_i|      (token-mean)

with Â recomputed here from the logged rewards (group z-score, unbiased std + 1e-6). That checks
rollout → reward → advantage → packing → Megatron forward → loss → global normalisation at once.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
G = 4
P = 4
TINY = [
    "--rollout-batch-size", str(P), "--n-samples-per-prompt", str(G), "--rollout-max-response-len", "12",
    "--sft-warmup-steps", "0", "--synthetic-num-prompts", "64", "--seed", "7", "--no-progress",
    "--sample-log-interval", "1", "--samples-per-step", "-1", "--lr", "1e-3",
    "--custom-reward-path", "tests.trainer.rewards:digit_fraction", "--reward-num-workers", "1",
    # Megatron's MoE load-balancing loss is computed per micro-batch and DP rank, so it legitimately
    # changes with the layout; without it the layouts must agree to float32 precision.
    "--moe-aux-loss-coeff", "0",
    # On-policy (the closed forms below): one optimizer step per rollout, where the default has two.
    "--num-steps-per-rollout", "1",
]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(log_dir: Path, *flags: str, nproc: int = 1, timeout: int = 600,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    args = [*TINY, "--log-dir", str(log_dir), *flags]
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "tools" / "train_luspo.py"), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={_free_port()}", str(ROOT / "tools" / "train_luspo.py"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env={**_env(), **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def rows(log_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (log_dir / name).read_text().splitlines()]


def expected_loss(samples: list[dict], loss: str) -> float:
    """The on-policy loss of one step from its logged samples (module docstring)."""
    samples = sorted(samples, key=lambda s: s["index"])
    lengths = [s["response_len"] for s in samples]
    advantages = []
    for g in range(0, len(samples), G):
        r = [s["reward"] for s in samples[g:g + G]]
        mean = sum(r) / G
        std = (sum((x - mean) ** 2 for x in r) / (G - 1)) ** 0.5
        advantages += [0.0 if max(r) == min(r) else (x - mean) / (std + 1e-6) for x in r]
    B = len(samples)
    if loss == "luspo":
        return -sum(n * a for n, a in zip(lengths, advantages)) / B
    if loss == "gspo":
        return -sum(advantages) / B
    return -sum(n * a for n, a in zip(lengths, advantages)) / sum(lengths)


def check_on_policy_losses(log_dir: Path, loss: str) -> list[dict]:
    metrics = rows(log_dir)
    samples = rows(log_dir, "samples.jsonl")
    for row in metrics:
        step_samples = [s for s in samples if s["step"] == row["step"]]
        assert len(step_samples) == P * G and row["num_seqs"] == P * G
        expected = expected_loss(step_samples, loss)
        assert row["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6), (row["step"], row["loss"], expected)
        assert row["mean_abs_log_ratio"] == 0.0 and row["clip_frac"] == 0.0
    assert any(abs(r["loss"]) > 1e-3 for r in metrics) or loss == "gspo"  # the check is not vacuous
    return metrics


@pytest.fixture(scope="module")
def luspo_run(tmp_path_factory):
    """One process, LUSPO, 4 steps, checkpoints at steps 2 and 4."""
    log_dir = tmp_path_factory.mktemp("luspo")
    train(log_dir, "--train-iters", "4", "--loss", "luspo", "--save", str(log_dir / "ckpt"), "--save-interval", "2")
    return log_dir


def test_luspo_run_logs_every_metric_and_the_on_policy_loss_equals_its_closed_form(luspo_run):
    metrics = check_on_policy_losses(luspo_run, "luspo")
    assert [r["step"] for r in metrics] == [1, 2, 3, 4]
    for key in ("step", "loss", "reward_mean", "response_len_mean", "clip_frac", "grad_norm", "kl", "entropy",
                "time_rollout_s", "time_train_s", "time_step_s", "tokens_per_s", "length_weight_share",
                "truncation_rate", "advantage_std"):
        assert key in metrics[-1], key
    assert all(r["grad_norm"] > 0 and r["skipped_steps"] == 0 for r in metrics)
    assert (luspo_run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (luspo_run / "ckpt" / "latest").read_text().strip().endswith("4")


def test_resume_from_a_checkpoint_continues_metrics_and_data_order_exactly(luspo_run, tmp_path):
    log_dir = tmp_path / "resumed"
    log_dir.mkdir()
    before = rows(luspo_run)
    # The resumed run logs into a copy of the first run's directory: metrics.jsonl is cut back to step 2.
    (log_dir / "metrics.jsonl").write_text((luspo_run / "metrics.jsonl").read_text())
    train(log_dir, "--train-iters", "4", "--loss", "luspo", "--load", str(luspo_run / "ckpt"), "--ckpt-step", "2")
    after = rows(log_dir)
    assert [r["step"] for r in after] == [1, 2, 3, 4]
    for old, new in zip(before[2:], after[2:]):  # steps 3 and 4 repeat bit for bit
        for key in ("loss", "grad_norm", "reward_mean", "response_len_mean", "entropy", "kl"):
            assert new[key] == old[key], (new["step"], key, new[key], old[key])


# Slow since the rehearsal (test_rehearsal.py: torchrun --tp 2, checked against its checkpoints) and
# tests/parallel/test_invariance.py[tp2] (the step against one process) cover it in make test.
@pytest.mark.slow
def test_two_process_tensor_parallel_run_matches_the_single_process_run(luspo_run, tmp_path):
    log_dir = tmp_path / "tp2"
    train(log_dir, "--train-iters", "3", "--loss", "luspo", "--tp", "2", nproc=2)
    single, tp2 = rows(luspo_run)[:3], rows(log_dir)
    for a, b in zip(single, tp2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["response_len_mean"] == a["response_len_mean"]


def test_inprocess_engine_run_samples_and_trains_exactly_as_the_local_server_run(luspo_run, tmp_path):
    # The same seeds reach the same generator either way (rollout/local/inprocess.py), and the in-memory
    # weight sync hands over the very float32 tensors the disk sync writes: the runs must agree.
    log_dir = tmp_path / "inprocess"
    train(log_dir, "--train-iters", "3", "--loss", "luspo", "--rollout-engine", "inprocess", "--weight-sync", "tensor")
    assert not (log_dir / "rollout_servers").exists() and not (log_dir / "rollout_weights").exists()
    served, inprocess = rows(luspo_run)[:3], check_on_policy_losses(log_dir, "luspo")
    for a, b in zip(served, inprocess):
        assert b["response_len_mean"] == a["response_len_mean"] and b["reward_mean"] == a["reward_mean"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    texts = [[s["response"] for s in rows(d, "samples.jsonl") if s["step"] <= 3] for d in (luspo_run, log_dir)]
    assert texts[0] == texts[1]


def test_routing_replay_run_gets_the_servers_routing_and_stays_on_policy(luspo_run, tmp_path):
    # R3 through the local server: the client must ask for routed_experts (it did not, and the run
    # stopped at the first step). On-policy, replaying the rollout's routing changes nothing: the
    # closed-form loss holds and step 1 equals the run without replay.
    log_dir = tmp_path / "r3"
    train(log_dir, "--train-iters", "2", "--loss", "luspo", "--use-rollout-routing-replay")
    metrics = check_on_policy_losses(log_dir, "luspo")
    first = rows(luspo_run)[0]
    assert metrics[0]["loss"] == pytest.approx(first["loss"], rel=1e-6, abs=1e-7)
    assert metrics[0]["response_len_mean"] == first["response_len_mean"]


# The trainer's local servers accept faults only when told to (tests), and want the run's API key.
FAULTY_SERVERS = {"LUSPO_ROLLOUT_ENABLE_FAULT_INJECTION": "1", "LUSPO_ROLLOUT_API_KEY": "test-key-not-secret"}


def _kill_server_mid_rollout(log_dir: Path, stop: threading.Event) -> None:
    """Once the local server is up, make it exit on its 3rd next /generate (mid-rollout)."""
    log = log_dir / "rollout_servers" / "server_0.log"
    while not stop.is_set():
        text = log.read_text() if log.exists() else ""
        match = re.search(r"ready (http://\S+)", text)
        if match:
            body = json.dumps({"exit_after": 3}).encode()
            req = urllib.request.Request(f"{match[1]}/luspo/faults", data=body, method="POST", headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {FAULTY_SERVERS['LUSPO_ROLLOUT_API_KEY']}"})
            urllib.request.urlopen(req, timeout=10).read()
            return
        time.sleep(0.2)


@pytest.mark.slow  # ≈ 30 s; the client's retries and the supervisor's restart are also tested in tests/rollout
def test_gspo_run_survives_its_rollout_server_dying_mid_rollout(tmp_path):
    stop = threading.Event()
    killer = threading.Thread(target=_kill_server_mid_rollout, args=(tmp_path, stop), daemon=True)
    killer.start()
    try:
        train(tmp_path, "--train-iters", "3", "--loss", "gspo", env=FAULTY_SERVERS)
    finally:
        stop.set()
    metrics = check_on_policy_losses(tmp_path, "gspo")
    assert [r["step"] for r in metrics] == [1, 2, 3]
    assert metrics[-1]["rollout_engine_restarts"] >= 1  # it died, was restarted, and no sample was lost


def test_grpo_run_token_mean_loss_equals_its_closed_form(tmp_path):
    # The in-process engine: no server start-up, and the closed form also covers that path for GRPO.
    train(tmp_path, "--train-iters", "2", "--loss", "grpo", "--rollout-engine", "inprocess", "--weight-sync", "tensor")
    check_on_policy_losses(tmp_path, "grpo")


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--ep", "2"], ["--pp", "2"]], ids=["ep2", "pp2"])
def test_two_process_expert_and_pipeline_parallel_runs_match_the_single_process_run(luspo_run, tmp_path, layout):
    train(tmp_path, "--train-iters", "3", "--loss", "luspo", *layout, nproc=2)
    check_on_policy_losses(tmp_path, "luspo")  # each run against the closed form, as the one-process run
    for a, b in zip(rows(luspo_run)[:3], rows(tmp_path)):
        # abs: an on-policy LUSPO loss is a float32 sum of B terms |y_i|·Â_i of order 10 that cancel to
        # ≈ 0; summed in another order (experts on two ranks) it moves by ~1e-7 (the closed-form check's 1e-6).
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


# Heavier end-to-end runs (make test-all): they keep make test under 10 minutes on 2 cores.
@pytest.mark.slow
def test_the_sft_start_carries_its_tokenizer_so_a_second_run_can_start_from_it(tmp_path):
    """``assets/hf_after_sft`` is the shared start of benchmarks/length_dynamics.py: it must hold the
    run's (task-restricted) tokenizer, or a run started from it would fall back to the full Qwen3
    vocabulary and map ids to the wrong embedding rows."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    first = tmp_path / "sft"
    train(first, "--train-iters", "1", "--sft-warmup-steps", "2", "--sft-direct-fraction", "0.5")
    start = first / "assets" / "hf_after_sft"
    run_tok = AutoTokenizer.from_pretrained(str(first / "assets" / "tokenizer"))
    start_tok = AutoTokenizer.from_pretrained(str(start))
    assert start_tok.get_vocab() == run_tok.get_vocab() and len(start_tok) < 1000
    init = {k: v for f in (first / "assets" / "hf_init").glob("*.safetensors") for k, v in load_file(f).items()}
    after = {k: v for f in start.glob("*.safetensors") for k, v in load_file(f).items()}
    assert after.keys() == init.keys()
    assert any(not (after[k] == init[k]).all() for k in init)  # the warm-up trained the weights it wrote

    second = tmp_path / "rl"
    train(second, "--train-iters", "1", "--hf-checkpoint", str(start))
    # The second run took the start's tokenizer (no task tokenizer of its own): with the full Qwen3
    # vocabulary its prompt ids would overflow the start's 128-row embedding.
    assert not (second / "assets" / "tokenizer").exists()
    samples = rows(second, "samples.jsonl")
    assert samples and all("Start with" in json.dumps(s["prompt"]) for s in samples)


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    """SIGTERM mid-run: the step in flight completes, a checkpoint of exactly the logged steps is
    written, the process exits 0 and takes its rollout server with it."""
    import signal

    cmd = [sys.executable, str(ROOT / "tools" / "train_luspo.py"), *TINY, "--log-dir", str(tmp_path),
           "--train-iters", "200", "--save", str(tmp_path / "ckpt"), "--save-interval", "1000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not ((tmp_path / "metrics.jsonl").exists() and rows(tmp_path)) and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    logged = rows(tmp_path)
    assert 1 <= len(logged) < 200
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == str(logged[-1]["step"])
    time.sleep(1.0)
    assert not _processes_mentioning(str(tmp_path)), "the rollout server outlived the trainer"


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (the local server's holds the run's log dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (entry / "status").read_text()
            except OSError:
                continue
            if text in cmdline and "zombie" not in state:
                found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_three_non_finite_steps_in_a_row_stop_the_run_with_a_checkpoint(tmp_path):
    """An absurd learning rate blows the weights up after step 1; every later loss is non-finite,
    each of those optimizer steps is skipped (weights untouched), and the third in a row stops the
    run with a one-line message, exit status 1 and a checkpoint."""
    cmd = [sys.executable, str(ROOT / "tools" / "train_luspo.py"), *TINY, "--log-dir", str(tmp_path),
           "--train-iters", "10", "--lr", "1e30", "--clip-grad", "0", "--save", str(tmp_path / "ckpt"),
           "--save-interval", "1000"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "3 optimizer steps in a row had a non-finite loss or gradient" in proc.stderr.strip().splitlines()[-1]
    logged = rows(tmp_path)
    skipped = [r["skipped_steps"] for r in logged]
    assert skipped[-3:] == [1, 1, 1] and len(logged) < 10
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == str(logged[-1]["step"])
