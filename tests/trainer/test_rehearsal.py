"""The rehearsal of the GPU example on CPU: ``torchrun --nproc-per-node 2 tools/train_luspo.py --config
examples/qwen3_30b_a3b_luspo.yaml`` for 3 steps, against two ``tools/serve_local.py`` servers behind
the real sglang-router, with the example's own ``--weight-sync distributed`` over gloo.

Only these are overridden: the model (a tiny Qwen3-MoE HF directory with a task tokenizer), the
batch sizes (P prompts × G samples; the global batch P·G/4 keeps the example's 4 optimizer steps
per rollout), the response length, the data (a DAPO-schema JSONL), the step count, the paths the
example leaves as placeholders (checkpoint load/save, log dir, router URL), the layout, and for the
checks: a checkpoint every step and every sample in samples.jsonl. Every other switch of the
example runs as it is set (bf16, sequence parallel, distributed optimizer, TIS, dynamic sampling,
--load-if-exists, --keep-last 3, routing replay off, a 512 MiB sync bucket).

The oracles:
- after each sync (the test reads the servers while the trainer runs, between a version change and
  the next), every parameter ``/get_weights_by_name`` returns from each server equals, bit for bit,
  the same parameter of that step's checkpoint converted with tools/convert_megatron_to_hf.py (bf16
  weights, read back as float32: exact);
- every sample in samples.jsonl carries the version pushed before its step ("default" before the
  first push), and metrics.jsonl counts no stale sample.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.checkpoint.helpers import read_tensors, tool_main
from tests.rollout.conftest import http
from tests.rollout.real_router import SGLangRouter

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "qwen3_30b_a3b_luspo.yaml"
P, G, STEPS = 2, 4, 3
# (question, answer, the wrong answer the tiny model is taught as often as the right one)
QUESTIONS = [("What is 2 + 3?", "5", "6"), ("What is 7 - 4?", "3", "2"), ("What is 3 times 3?", "9", "8"),
             ("What is 8 / 2?", "4", "7")]


# (section, key) of examples/qwen3_30b_a3b_luspo.yaml that the rehearsal overrides.
OVERRIDDEN = {
    ("model", "hf_checkpoint"), ("rollout", "sglang_router"), ("rollout", "rollout_batch_size"),
    ("rollout", "max_response_len"), ("algorithm", "n_samples_per_prompt"), ("optimizer", "global_batch_size"),
    ("data", "prompt_data"), ("checkpoint", "load"), ("checkpoint", "save"), ("checkpoint", "save_interval"),
    ("logging", "log_dir"), ("logging", "sample_interval"), ("train_iters", None),
    ("parallel", "tensor_model_parallel_size"), ("parallel", "expert_model_parallel_size"),
    ("parallel", "expert_tensor_parallel_size"),
}


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A DAPO-Math-17k-schema JSONL and a tiny Qwen3-MoE (hidden 64, 2 layers, 4 experts top-2) with
    the Qwen3 tokenizer restricted to the data's texts, taught to answer ``\\boxed{right}`` or
    ``\\boxed{wrong}`` about equally often: the math reward then differs inside most groups, so
    dynamic sampling keeps groups and every optimizer step has a loss (a random model scores 0
    everywhere: every group flat, nothing to train on)."""
    from transformers import AutoTokenizer

    from luspo_megatron.data.dataset import PromptDataset
    from luspo_megatron.data.vocab_subset import restrict_tokenizer
    from luspo_megatron.models import tiny_qwen3_moe
    from tests.hf_models import build_hf_model

    root = tmp_path_factory.mktemp("rehearsal_inputs")
    rows = [{"data_source": "math_dapo", "ability": "MATH", "extra_info": {"index": i},
             "prompt": [{"role": "user", "content": f"{q} Put the answer in \\boxed{{}}."}],
             "reward_model": {"ground_truth": a, "style": "rule-verified"}} for i, (q, a, _) in enumerate(QUESTIONS)]
    data = root / "dapo_tiny.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_dir = root / "qwen3_moe_tiny"
    restrict_tokenizer([f"\\boxed{{{x}}}" for _, a, b in QUESTIONS for x in (a, b)], model_dir,
                       chats=[r["prompt"] for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = tiny_qwen3_moe(vocab_size=-(-len(tokenizer) // 128) * 128, num_hidden_layers=2, num_experts=4)
    config.update(eos_token_id=eos, bos_token_id=None, pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    model = build_hf_model(config, seed=0).train()
    records = PromptDataset.from_file(str(data), tokenizer).records  # the trainer's own prompt ids
    pairs = [(r.prompt_ids, tokenizer(f"\\boxed{{{x}}}", add_special_tokens=False)["input_ids"] + [eos])
             for r, (_, a, b) in zip(records, QUESTIONS) for x in (a, b)]
    width = max(len(p) + len(t) for p, t in pairs)
    ids = torch.zeros(len(pairs), width, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100)
    for i, (prompt, target) in enumerate(pairs):
        ids[i, :len(prompt) + len(target)] = torch.tensor(prompt + target)
        labels[i, len(prompt):len(prompt) + len(target)] = torch.tensor(target)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(100):  # cross-entropy → ln 2 per answer digit: right and wrong equally likely
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(model_dir)
    return data, model_dir


class ServerReader:
    """Reads what the servers hold, from the test's own thread, while the trainer runs. On each new
    weight version it pauses both servers (in place: the trainer's next requests wait, so no sync
    can follow before the read ends; pausing twice outlasts the trainer's own /continue_generation
    that ends the sync), reads every parameter, checks the version did not move, and resumes them."""

    def __init__(self, urls: list[str], names: dict[str, int]) -> None:
        self.urls, self.names = urls, names  # HF name -> rows (truncate_size that reads it whole)
        self.snapshots: dict[str, list[dict[str, torch.Tensor]]] = {}
        self.missed: list[str] = []
        self.stop = threading.Event()

    def version(self, url: str) -> str:
        return http("GET", f"{url}/model_info", timeout=60)[1]["weight_version"]

    def read(self, url: str) -> dict[str, torch.Tensor]:
        out = {}
        for name, rows in self.names.items():
            status, values = http("POST", f"{url}/get_weights_by_name", {"name": name, "truncate_size": rows},
                                  timeout=60)
            assert status == 200, (url, name, values)
            out[name] = torch.tensor(values, dtype=torch.float32)
        return out

    def control(self, path: str, body: dict) -> None:
        for url in self.urls:
            assert http("POST", f"{url}{path}", body, timeout=60)[0] == 200

    def poll_once(self) -> None:
        versions = [self.version(u) for u in self.urls]
        if len(set(versions)) != 1 or versions[0] in self.snapshots or versions[0] == "default":
            return
        try:
            for _ in range(2):
                self.control("/pause_generation", {"mode": "in_place"})
                time.sleep(0.3)
            snapshot = [self.read(u) for u in self.urls]
            if [self.version(u) for u in self.urls] == versions:
                self.snapshots[versions[0]] = snapshot
            else:
                self.missed.append(versions[0])
        finally:
            self.control("/continue_generation", {})

    def run(self) -> None:
        while not self.stop.wait(0.2):
            try:
                self.poll_once()
            except OSError:  # a server busy past the timeout: try again
                continue


def serve_local(model: Path, allowed: Path, log: Path) -> tuple[subprocess.Popen, str]:
    from luspo_megatron.runtime.distributed import free_port

    port = free_port()
    cmd = [sys.executable, str(ROOT / "tools" / "serve_local.py"), "--hf-dir", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--allowed-weight-dirs", str(allowed)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, url: str, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{url}: the server exited"
        try:
            if http("GET", f"{url}/model_info", timeout=5)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url}: not up within {timeout_s:.0f} s")


def rehearse(tmp: Path, inputs: tuple[Path, Path], layout: list[str], weight_sync: str = "distributed",
             runs: tuple[int, ...] = (STEPS,), extra: tuple[str, ...] = ()) -> dict:
    """Run the example as the module docstring says, once per entry of ``runs`` (its --train-iters:
    (2, 3) stops after step 2 and resumes, --load-if-exists, for step 3), against the same servers;
    return what the checks need."""
    data, model = inputs
    log_dir, ckpt = tmp / "run", tmp / "ckpt"
    hf = {name: t.shape[0] for name, t in read_tensors(model).items()}
    # The router lists both servers before the trainer starts: a worker it listed only after the first
    # sync would (rightly) be held out of the router until the second, and miss snapshot "1".
    servers = [serve_local(model, log_dir / "rollout_weights", tmp / f"server_{i}.log") for i in range(2)]
    procs = [p for p, _ in servers]
    try:
        for proc, url in servers:
            wait_ready(proc, url)
        with SGLangRouter([url for _, url in servers], log_path=tmp / "router.log") as router:
            reader = ServerReader([url for _, url in servers], hf)
            watcher = threading.Thread(target=reader.run, daemon=True)
            watcher.start()
            try:
                for number, train_iters in enumerate(runs):
                    overrides = [
                        "--hf-checkpoint", str(model), "--prompt-data", str(data),
                        "--rollout-batch-size", str(P), "--n-samples-per-prompt", str(G),
                        "--global-batch-size", str(P * G // 4),
                        "--rollout-max-response-len", "8", "--train-iters", str(train_iters),
                        "--load", str(ckpt), "--save", str(ckpt), "--log-dir", str(log_dir),
                        "--sglang-router", router.url,
                        "--save-interval", "1", "--sample-log-interval", "1", "--samples-per-step", "-1",
                        "--no-progress", *layout, *extra,
                    ]
                    if weight_sync != "distributed":
                        overrides += ["--weight-sync", weight_sync]
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(_free_port()), str(ROOT / "tools" / "train_luspo.py"), "--config", str(EXAMPLE),
                           *overrides]
                    run = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
                    (tmp / f"train_{number}.log").write_text(run.stdout + run.stderr)
                    assert all(p.poll() is None for p in procs), "a server died; see server_*.log"
                    assert run.returncode == 0, _first_traceback(run.stderr)
            finally:
                reader.stop.set()
                watcher.join()
            reader.poll_once()  # the last sync, after the run
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    return {"log_dir": log_dir, "ckpt": ckpt, "snapshots": reader.snapshots, "missed": reader.missed,
            "model": model}


def _first_traceback(stderr: str) -> str:
    """The first rank's traceback (torchrun's own summary follows it), or the tail."""
    start = stderr.find("Traceback")
    return stderr[start:start + 6000] if start >= 0 else stderr[-6000:]


def _free_port() -> int:
    from luspo_megatron.runtime.distributed import free_port

    return free_port()


def converted(ckpt: Path, step: int, out: Path) -> dict[str, torch.Tensor]:
    """Step ``step`` of the run's checkpoints, through tools/convert_megatron_to_hf.py."""
    step_dir = next(p for p in ckpt.iterdir() if p.is_dir() and p.name.endswith(f"{step:07d}"))
    assert tool_main("convert_megatron_to_hf")(["--load", str(step_dir), "--save", str(out), "--no-progress"]) == 0
    return read_tensors(out)


def check_rehearsal(result: dict, tmp: Path, weight_sync: str = "distributed", async_rollout: bool = False) -> None:
    log_dir = result["log_dir"]
    # Every setting of the example holds in the run's config but the overridden ones (module docstring).
    config = yaml.safe_load((log_dir / "config.yaml").read_text())
    example = yaml.safe_load(EXAMPLE.read_text())
    for section, values in example.items():
        for key, value in values.items() if isinstance(values, dict) else [(None, values)]:
            if (section, key) not in OVERRIDDEN and not (key == "weight_sync" and weight_sync != "distributed"):
                assert (config[section] if key is None else config[section][key]) == value, (section, key)
    assert config["rollout"]["weight_sync"] == weight_sync and config["rollout"]["engine"] == "sglang"
    metrics = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics] == list(range(1, STEPS + 1))
    for r in metrics:  # 4 optimizer steps per rollout, TIS weights, dynamic sampling, no stale sample
        # num_seqs adds up over the rollout's optimizer steps (trainer/policy_step.py::merge_step_metrics)
        assert r["optimizer_steps"] == 4 and r["num_seqs"] == P * G and r["tis_num_terms"] > 0, r
        assert r["num_groups"] == P and "dynamic_sampling_dropped_groups" in r, r
        if async_rollout:  # step k's samples were drawn while step k − 1 trained: one version behind
            assert r["weight_staleness_max"] == r["weight_staleness_mean"] == min(r["step"] - 1, 1), r
            # every sample of step ≥ 2 is one version old, within the default bound of 1 (rollout/versions.py)
            assert r["stale_samples"] == 0 if r["step"] == 1 else r["stale_samples"] >= P * G, r
        else:
            assert r["stale_samples"] == 0, r
    # Every sample carries the version pushed before its step: none at step 1 (the servers' "default").
    # With --async-rollout, the version pushed before the step before (docs/async.md).
    samples = [json.loads(line) for line in (log_dir / "samples.jsonl").read_text().splitlines()]
    for step in range(1, STEPS + 1):
        versions = {s["weight_version"] for s in samples if s["step"] == step}
        drawn_by = max(step - 2, 0) if async_rollout else step - 1
        assert versions == {"default" if drawn_by == 0 else str(drawn_by)}, (step, versions)
    # After each sync, each server holds exactly the trainer's checkpoint of that step.
    # Under --async-rollout a step's samples are drawn before the sync before it, so pausing the servers
    # holds no sync back (a tiny model's generation ends before the pause): versions before the last may
    # be gone before they are read. The last one is read after the run.
    racy = set(map(str, range(1, STEPS))) if async_rollout else set()
    assert set(result["missed"]) <= racy, result["missed"]
    assert set(map(str, range(1, STEPS + 1))) - racy <= set(result["snapshots"]) <= set(map(str, range(1, STEPS + 1)))
    previous = {name: t.to(torch.bfloat16) for name, t in read_tensors(result["model"]).items()}
    for step in range(1, STEPS + 1):
        reference = converted(result["ckpt"], step, tmp / f"hf_step{step}")
        assert reference.keys() == previous.keys()
        for held in result["snapshots"].get(str(step), []):
            assert held.keys() == reference.keys()
            for name, tensor in reference.items():
                assert tensor.dtype == torch.bfloat16, name
                assert torch.equal(held[name], tensor.float()), (step, name)
        # Not vacuous: every step's optimizer steps moved some bf16 weights, so each sync is told apart.
        assert any(not torch.equal(previous[n], t) for n, t in reference.items()), step
        previous = reference


def test_the_example_rehearses_on_cpu_with_tp2_and_distributed_sync(inputs, tmp_path):
    check_rehearsal(rehearse(tmp_path, inputs, ["--tp", "2", "--ep", "1", "--etp", "2"]), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--tp", "1", "--ep", "2"], ["--tp", "1", "--ep", "1", "--pp", "2"]],
                         ids=["ep2", "pp2"])
def test_the_example_rehearses_with_expert_and_pipeline_parallel_layouts(inputs, tmp_path, layout):
    check_rehearsal(rehearse(tmp_path, inputs, layout), tmp_path)


@pytest.mark.slow
def test_the_example_rehearses_with_disk_sync_and_a_resume_that_pushes_the_resumed_step_first(inputs, tmp_path):
    # Stopped after step 2 and resumed (--load-if-exists): the resumed trainer pushes version "2" before
    # step 3's rollout, so step 3's samples carry "2" like an uninterrupted run's.
    result = rehearse(tmp_path, inputs, ["--tp", "2", "--ep", "1", "--etp", "2"], weight_sync="disk", runs=(2, 3))
    assert re.search(r"resumed from \S+iter_0000002 at step 2", (tmp_path / "train_1.log").read_text())
    check_rehearsal(result, tmp_path, weight_sync="disk")


@pytest.mark.slow
def test_the_example_rehearses_with_async_rollout_behind_the_router(inputs, tmp_path):
    # Issue 17's slow test: the async trainer for 3 steps against two servers behind the real router,
    # with the example's TIS kept meaningful (--async-correction recompute: π_old recomputed, corrected
    # toward the engine that sampled one version earlier).
    result = rehearse(tmp_path, inputs, ["--tp", "2", "--ep", "1", "--etp", "2"],
                      extra=("--async-rollout", "--async-correction", "recompute"))
    check_rehearsal(result, tmp_path, async_rollout=True)
