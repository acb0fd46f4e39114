"""Side by side with TRL on CPU: the same LUSPO run in TRL's GRPOTrainer and in our trainer.

    pip install -c requirements/constraints.txt -r requirements/bench.txt    # or: make bench-deps
    OMP_NUM_THREADS=1 python benchmarks/vs_trl.py --quick    # 5 RL steps, 4 prompts x G=4, 32 tokens
    OMP_NUM_THREADS=1 python benchmarks/vs_trl.py --quick --repeat 3 --no-tp2   # medians of 3 (docs/bench)
    OMP_NUM_THREADS=1 python benchmarks/vs_trl.py            # 6 RL steps, 8 prompts x G=8, 64 tokens

What is held equal (one run of this script):

* **weights**: the tiny Qwen3-MoE preset with the task vocabulary, built once by our
  ``run_assets.prepare`` and saved in HF format with its tokenizer (``<workdir>/assets/hf_init``);
  both frameworks load it in float32. The MoE load-balancing loss is off on both sides
  (``--moe-aux-loss-coeff 0``, ``router_aux_loss_coef=0``): the two define it differently
  (per layer in Megatron, over all layers in transformers), so it would blur the loss column.
* **prompts**: the synthetic arithmetic task, written once to ``<workdir>/prompts.jsonl``. Our
  trainer reads it with ``--prompt-data``; TRL gets the same rows in the order our
  ``PromptIterator`` visits them, with ``shuffle_dataset=False``, so step s sees the same P prompts
  in both. Both render them with the tokenizer's chat template (``enable_thinking=False``).
* **the RL step**: G samples per prompt, max response length, temperature (top-p 1, no top-k), one
  optimizer step per rollout on all P·G sequences (TRL: ``per_device_train_batch_size=P·G``,
  ``steps_per_generation=1``, ``gradient_accumulation_steps=1``, ``num_iterations=1``), LUSPO with
  our default clips (ε_lo, ε_hi) = (2e-3, 2.5e-3), β = 0, AdamW(lr, 0.9, 0.98, 1e-8, wd 0), grad
  clip 1.0, constant LR; the reward is our math-verify ``math_score`` (TRL calls it in-process; our
  trainer in its reward pool).
* **threads**: every process of ours runs with the caller's ``OMP_NUM_THREADS`` (default 1). TRL runs
  twice, with ``torch.set_num_threads`` (and ``OMP_NUM_THREADS``) equal to that and equal to the
  machine's core count, and is compared by its best.

Ours runs four ways: one process with our rollout server (the default), the same with
``--async-rollout`` (step n+1 generated in the server while step n trains), one process with the
in-process engine (``--rollout-engine inprocess --weight-sync tensor``), and ``torchrun --tp 2``.
Each run is its own subprocess; ``--repeat R`` runs every row R times, interleaved, and reports
medians (the machine these figures come from is shared). Times are per RL step (rollout =
generation, reward, train = log-probs + loss + backward + optimizer, sync = our weight push to the
rollout server), the mean over steps 2 … N−1 (the first pays one-off warm-ups and, async, fills the
pipeline; the last drains it) and the first step alone. CPU-seconds per step: the CPU time of the
whole process tree over the same steps, split by kind of process (trainer, rollout server, reward
workers, TRL), sampled from /proc every 0.05 s and marked at each step's end (our metrics.jsonl
gains a row; the TRL child appends to a progress file). Peak memory: the largest single-process
peak RSS in the tree (ru_maxrss of RUSAGE_CHILDREN in a lean launcher process, which covers every
reaped descendant) and the peak of Σ PSS over the live process tree (sampled by psutil every 0.2 s;
PSS splits shared pages, so forked workers are not double counted).

The first-step LUSPO loss of the two runs differs because the samples differ (each framework draws
its own). Agreement of the loss itself is checked on identical inputs, without sampling, by
:func:`loss_on_fixed_batch`: one fixed batch through TRL's own ``GRPOTrainer._compute_loss`` and
through our ``policy_loss``, in float64, values and parameter gradients (also a fast test,
tests/benchmarks/test_vs_trl_loss.py).

Nothing is installed at import time; without ``trl`` the script says how to install it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: `luspo_megatron` without installing
    sys.path.insert(0, str(ROOT))

GiB, MiB = 1024**3, 1024**2
INSTALL_HINT = "pip install -c requirements/constraints.txt -r requirements/bench.txt   (or: make bench-deps)"


# ------------------------------------------------------------------------- loss on a fixed batch
def loss_on_fixed_batch(num_prompts: int = 2, group: int = 4, prompt_len: int = 6, max_completion: int = 9,
                        seed: int = 0) -> dict[str, Any]:
    """TRL's LUSPO loss and ours on one fixed batch, float64, no sampling.

    A tiny Qwen3-MoE (float64, vocab 256) scores fixed prompts (all of one length, so no left
    padding shifts positions) and right-padded completions of different lengths. ``old`` log-probs
    are the model's own plus a fixed perturbation, so the sequence ratios s_i straddle the clip range
    [1 − ε_lo, 1 + ε_hi]; the advantages are group-normalised random rewards.

    * TRL: ``GRPOTrainer._compute_loss(model, inputs)`` with ``loss_type="luspo"``,
      ``importance_sampling_level="sequence"``: its own forward, ratio, clip and
      ``(per_token_loss * mask).sum(-1).mean()``.
    * ours: a separate plain forward of the same model, the completion log-probs packed (THD) and
      ``luspo_megatron.algorithms.losses.policy_loss(..., LossConfig("luspo"), num_sequences=B)``.
    * oracle: (1/B) Σ_i |y_i| · ℓ_i written out from docs/design.md §2.

    Returns the three loss values, the largest parameter-gradient difference (TRL vs ours) and the
    number of clipped sequences."""
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from luspo_megatron.algorithms.advantages import group_advantages
    from luspo_megatron.algorithms.losses import LossConfig, clipped_surrogate, policy_loss
    from luspo_megatron.data.tokenizer import load_tokenizer
    from luspo_megatron.models.arch import tiny_qwen3_moe, transformers_config

    torch.manual_seed(seed)
    cfg = LossConfig(name="luspo")
    B = num_prompts * group
    vocab = 256
    hf = tiny_qwen3_moe(vocab_size=vocab, router_aux_loss_coef=0.0, pad_token_id=0, eos_token_id=1)
    # eager experts: transformers' grouped_mm kernel has no float64 path.
    model = AutoModelForCausalLM.from_config(transformers_config(hf), experts_implementation="eager").to(torch.float64)
    gen = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(2, vocab, (B, prompt_len), generator=gen)
    lengths = torch.randint(1, max_completion + 1, (B,), generator=gen)
    lengths[0] = max_completion  # at least one full-length row, so the padded width is max_completion
    completion_ids = torch.randint(2, vocab, (B, max_completion), generator=gen)
    completion_mask = (torch.arange(max_completion)[None, :] < lengths[:, None]).long()
    completion_ids = completion_ids * completion_mask  # right padding with pad id 0
    rewards = torch.randint(0, 2, (B,), generator=gen).double()
    rewards[0], rewards[1] = 1.0, 0.0  # the first group is never flat
    advantages = group_advantages(rewards, group)

    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(
            output_dir=tmp, loss_type="luspo", importance_sampling_level="sequence", epsilon=cfg.eps_clip,
            epsilon_high=cfg.eps_clip_high, beta=0.0, per_device_train_batch_size=B, num_generations=group,
            gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, use_cpu=True, bf16=False,
            fp16=False, report_to=[], router_aux_loss_coef=0.0, max_completion_length=max_completion,
            dataloader_num_workers=0, disable_tqdm=True,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
                              args=args, train_dataset=Dataset.from_list([{"prompt": "x"}] * B),
                              processing_class=load_tokenizer())
        model = trainer.model
        model.train()
        trainer.current_gradient_accumulation_steps = 1  # the training loop sets it; one micro-batch here

        # Our forward: plain, no attention mask (prompts are unpadded; right padding is causal-invisible).
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits[:, prompt_len - 1:-1].double()
            logp_all = torch.log_softmax(logits, -1).gather(-1, completion_ids[..., None]).squeeze(-1)
        # π_old: the current log-probs shifted by a fixed per-token perturbation (seeded) whose
        # sequence means straddle ±ε: some sequences clipped, some not.
        perturb = 0.012 * torch.randn(B, max_completion, generator=gen, dtype=torch.float64)
        old = (logp_all + perturb) * completion_mask

        inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids),
                  "completion_ids": completion_ids, "completion_mask": completion_mask,
                  "advantages": advantages, "old_per_token_logps": old,
                  "num_items_in_batch": completion_mask.sum()}
        # Keep the log-probs TRL's own forward produced, to score our loss on exactly them too.
        captured = {}
        trl_logps = trainer._get_per_token_logps_and_entropies

        def capture(*a, **kw):
            out = trl_logps(*a, **kw)
            captured["logps"] = out[0]
            return out

        trainer._get_per_token_logps_and_entropies = capture
        params = [p for p in model.parameters() if p.requires_grad]
        keep = completion_mask.bool()
        cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)

        def ours_on(logp: torch.Tensor) -> torch.Tensor:
            packed_logp, packed_old = logp[keep], old[keep]  # row-major: sequence by sequence (THD)
            loss, _ = policy_loss(packed_logp, packed_old, advantages, torch.ones_like(packed_logp), cu_seqlens,
                                  cfg, num_sequences=B)
            return loss

        trl_loss = trainer._compute_loss(model, inputs)
        # TRL's fused lm-head path returns float32 log-probs even for a float64 model; from there on
        # its loss is float64 (δ with the float64 π_old), so ours gets them promoted the same way.
        ours_same = ours_on(captured["logps"].double())
        trl_grads = torch.autograd.grad(trl_loss, params, retain_graph=True, allow_unused=True)
        same_grads = torch.autograd.grad(ours_same, params, allow_unused=True)

        logits = model(input_ids=input_ids).logits[:, prompt_len - 1:-1]
        logp = torch.log_softmax(logits.double(), -1).gather(-1, completion_ids[..., None]).squeeze(-1)
        ours = ours_on(logp)
        our_grads = torch.autograd.grad(ours, params, allow_unused=True)

    # The oracle: s_i = exp(mean_t δ), ℓ_i = −min(s_i Â_i, clip(s_i) Â_i), loss = (1/B) Σ |y_i| ℓ_i.
    with torch.no_grad():
        delta = ((logp_all - old) * completion_mask).sum(1) / lengths
        surrogate = clipped_surrogate(torch.exp(delta), advantages, cfg.eps_clip, cfg.eps_clip_high)
        oracle = float((lengths.double() * surrogate.loss).sum() / B)

    def grad_diff(a, b) -> float:
        return max(float(((x if x is not None else 0) - (y if y is not None else 0)).abs().max())
                   for x, y in zip(a, b) if x is not None or y is not None)

    trl, ours, same = float(trl_loss.detach()), float(ours.detach()), float(ours_same.detach())
    return {"trl": trl, "ours": ours, "ours_on_trl_logps": same, "oracle": oracle,
            "abs_diff": abs(trl - ours), "abs_diff_same_logps": abs(trl - same),
            "grad_max_abs_diff": grad_diff(trl_grads, our_grads),
            "grad_max_abs_diff_same_logps": grad_diff(trl_grads, same_grads),
            "grad_max_abs": max(float(g.abs().max()) for g in trl_grads if g is not None),
            "logps_max_abs_diff": float((captured["logps"].detach() - logp.detach()).mul(keep).abs().max()),
            "trl_logps_dtype": str(captured["logps"].dtype).replace("torch.", ""),
            "clipped_sequences": int(surrogate.clipped.sum()), "sequences": B, "dtype": "float64"}


# ------------------------------------------------------------------------- the generation floor
def generation_floor(shared: dict[str, Any], args: argparse.Namespace, repeats: int = 5) -> dict[str, float]:
    """The decode loop alone, in this process with ``args.threads`` threads, on step 1's P·G rows
    (the same prompt ids our trainer sends, max response length, temperature): our server's
    generator (``TransformersGenerator``: per-row seeds, per-row stops, log-probs) and transformers'
    own sampling ``generate`` (what TRL calls). Median seconds over ``repeats`` calls after a
    warm-up: the compute floor of a rollout, without HTTP, scheduling, decoding or rewards."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    from luspo_megatron.config import load_config
    from luspo_megatron.data.dataset import dataset_from_config
    from luspo_megatron.rollout.local.generation import GenRow, TransformersGenerator

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        tokenizer = AutoTokenizer.from_pretrained(shared["hf_dir"])
        config, _ = load_config(["--config", shared["base"], "--prompt-data", shared["prompts"]])
        dataset = dataset_from_config(config.data, tokenizer, args.seed)
        prompts = [dataset[i].prompt_ids for i in shared["order"][:args.prompts]]
        stop = frozenset({tokenizer.eos_token_id})
        generator = TransformersGenerator(shared["hf_dir"])

        def ours() -> None:
            generator.generate([GenRow(list(p), args.max_response_len, seed=i * args.group + j,
                                       temperature=args.temperature, stop_ids=stop)
                                for i, p in enumerate(prompts) for j in range(args.group)])

        pad = tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts for _ in range(args.group)])
        hf_config = GenerationConfig(do_sample=True, max_new_tokens=args.max_response_len, top_k=0, top_p=1.0,
                                     temperature=args.temperature, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=pad)

        def transformers_generate() -> None:
            with torch.no_grad():
                generator.model.generate(input_ids=input_ids, attention_mask=(input_ids != pad).long(),
                                         generation_config=hf_config)

        out = {}
        for name, fn in (("ours", ours), ("transformers", transformers_generate)):
            fn()  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            out[name] = statistics.median(times)
        return out
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ the TRL child
def _trl_child(spec_path: str) -> None:
    """Train with TRL's GRPOTrainer in this process and write the per-step timings (JSON)."""
    spec = json.loads(Path(spec_path).read_text())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(spec["threads"])
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from luspo_megatron.rewards.math import math_score

    rows = [json.loads(line) for line in Path(spec["prompts"]).read_text().splitlines() if line.strip()]
    order = spec["order"]
    dataset = Dataset.from_list([{"prompt": rows[i]["prompt"], "ground_truth": rows[i]["reward_model"]["ground_truth"]}
                                 for i in order])

    def math_reward(completions, ground_truth, **kwargs) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [math_score(t, g) for t, g in zip(texts, ground_truth)]

    steps: list[dict[str, float]] = []
    current: dict[str, float] = {}

    class TimedGRPOTrainer(GRPOTrainer):
        """Times generation, reward and the whole generate-and-score call; counts tokens."""

        def _generate(self, *a, **kw):
            start = time.perf_counter()
            out = super()._generate(*a, **kw)
            current["rollout"] = current.get("rollout", 0.0) + time.perf_counter() - start
            return out

        def _calculate_rewards(self, *a, **kw):
            start = time.perf_counter()
            out = super()._calculate_rewards(*a, **kw)
            current["reward"] = current.get("reward", 0.0) + time.perf_counter() - start
            return out

        def _generate_and_score_completions(self, *a, **kw):
            start = time.perf_counter()
            out = super()._generate_and_score_completions(*a, **kw)
            current["generate_and_score"] = current.get("generate_and_score", 0.0) + time.perf_counter() - start
            current["response_tokens"] = float(out["completion_mask"].sum())
            current["tokens"] = float(out["prompt_mask"].sum() + out["completion_mask"].sum())
            return out

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            current.clear()
            current["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step = dict(current)
            step["step"] = time.perf_counter() - step.pop("start")
            step["train"] = step["step"] - step.get("generate_and_score", 0.0)
            steps.append(step)
            with open(spec["progress"], "a") as progress:  # the CPU monitor marks the step's end
                progress.write(f"{len(steps)}\n")

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs and steps and "loss" not in steps[-1]:
                steps[-1]["loss"] = float(logs["loss"])
                steps[-1]["reward_mean"] = float(logs.get("reward", float("nan")))

    model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(spec["hf_dir"])
    P, G = spec["prompts_per_step"], spec["group"]
    args = GRPOConfig(
        output_dir=spec["out_dir"], loss_type="luspo", importance_sampling_level="sequence",
        epsilon=spec["eps_clip"], epsilon_high=spec["eps_clip_high"], beta=0.0,
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.98, adam_epsilon=1e-8, max_grad_norm=1.0,
        per_device_train_batch_size=P * G, num_generations=G, gradient_accumulation_steps=1,
        steps_per_generation=1, num_iterations=1, max_completion_length=spec["max_response_len"],
        temperature=spec["temperature"], top_p=1.0, top_k=0, use_vllm=False, bf16=False, fp16=False, use_cpu=True,
        report_to=[], dataloader_num_workers=0, max_steps=spec["steps"], logging_steps=1, save_strategy="no",
        shuffle_dataset=False, seed=spec["seed"], router_aux_loss_coef=0.0,
        chat_template_kwargs={"enable_thinking": False}, disable_tqdm=True, log_completions=False,
    )
    trainer = TimedGRPOTrainer(model=model, reward_funcs=[math_reward], args=args, train_dataset=dataset,
                               processing_class=tokenizer, callbacks=[StepTimer()])
    trainer.train()
    Path(spec["result"]).write_text(json.dumps({"steps": steps}))


# ----------------------------------------------------------------------------- measuring runs
PROCESS_KINDS = ("trainer", "rollout server", "reward workers", "TRL", "other")


def _process_kind(cmdline: list[str]) -> str:
    """Which part of a run a process is, from its command line (for CPU-seconds per process)."""
    text = " ".join(cmdline)
    if "rollout.local.server" in text:
        return "rollout server"
    if "--trl-child" in text:
        return "TRL"
    if "multiprocessing" in text:  # the reward pool's forkserver and its forked workers
        return "reward workers"
    if "train_luspo.py" in text and "torch.distributed.run" not in text:
        return "trainer"
    return "other"  # the launcher, torchrun's agent


class _TreeMonitor:
    """Samples a process tree: peak Σ PSS (RSS where PSS is unreadable) every ``memory_every_s``, and
    the CPU seconds (user + system) of each kind of process every ``interval_s``. Each time the
    ``progress`` file gains a line (a step ended: our metrics.jsonl, the TRL child's step log), the
    CPU totals are recorded in :attr:`marks`, so that CPU-seconds per step are the differences."""

    def __init__(self, pid: int, progress: Path | None, interval_s: float = 0.05, memory_every_s: float = 0.2) -> None:
        import psutil

        self._psutil, self._root, self.interval_s = psutil, psutil.Process(pid), interval_s
        self.memory_every_s, self.progress = memory_every_s, progress
        self.peak = 0
        self.marks: list[dict[str, float]] = []
        self._kinds: dict[int, str] = {}
        self._cpu: dict[int, float] = {}  # last CPU seconds seen per live pid (a process that exits keeps it)
        self._lines = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _procs(self) -> list:
        try:
            return [self._root, *self._root.children(recursive=True)]
        except self._psutil.Error:
            return []

    def _memory(self, procs: list) -> int:
        total = 0
        for proc in procs:
            try:
                info = proc.memory_full_info()
                total += getattr(info, "pss", 0) or info.rss
            except self._psutil.Error:
                continue  # it exited between listing and reading
        return total

    def _cpu_by_kind(self, procs: list) -> dict[str, float]:
        for proc in procs:
            try:
                if proc.pid not in self._kinds:
                    self._kinds[proc.pid] = _process_kind(proc.cmdline())
                times = proc.cpu_times()
                self._cpu[proc.pid] = times.user + times.system
            except self._psutil.Error:
                continue
        totals = dict.fromkeys(PROCESS_KINDS, 0.0)
        for pid, seconds in self._cpu.items():
            totals[self._kinds.get(pid, "other")] += seconds
        return totals

    def _progress_lines(self) -> int:
        try:
            return sum(1 for line in self.progress.read_text().splitlines() if line.strip())
        except (OSError, AttributeError):
            return 0

    def _run(self) -> None:
        last_memory = 0.0
        while not self._stop.is_set():
            procs = self._procs()
            now = time.perf_counter()
            if now - last_memory >= self.memory_every_s:
                self.peak, last_memory = max(self.peak, self._memory(procs)), now
            cpu = self._cpu_by_kind(procs)
            lines = self._progress_lines()
            if lines > self._lines:
                self._lines = lines
                self.marks.append(cpu)
            self._stop.wait(self.interval_s)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


# A lean launcher between this process and each framework: a child exec'd straight from this
# process would inherit this process's RSS as its starting ru_maxrss (Linux records the pre-exec
# high-water mark), and this process holds torch and the loss check's model.
_LAUNCHER = (
    "import json, resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[2:])\n"
    "usage = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "open(sys.argv[1], 'w').write(json.dumps({'returncode': rc, 'maxrss_kib': usage.ru_maxrss}))\n"
)


def _measured(cmd: list[str], env: dict[str, str], log_path: Path, progress: Path | None) -> dict[str, Any]:
    """Run ``cmd`` to completion under the launcher; its wall time, exit status, memory peaks and
    the CPU seconds of its process tree at the end of each step (``progress`` gains a line per step).

    ru_maxrss of RUSAGE_CHILDREN in the launcher is the largest peak RSS of any process of the run
    (every descendant is reaped by its parent, and Linux keeps the max of reaped descendants)."""
    usage_path = log_path.with_suffix(".rusage.json")
    start = time.perf_counter()
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(usage_path), *cmd], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        monitor = _TreeMonitor(proc.pid, progress)
        proc.wait()
    tree_peak = monitor.stop()
    usage = json.loads(usage_path.read_text())
    return {"returncode": usage["returncode"], "wall_s": time.perf_counter() - start,
            "max_process_rss_mib": usage["maxrss_kib"] * 1024 / MiB, "peak_tree_pss_mib": tree_peak / MiB,
            "cpu_marks": monitor.marks}


def _summarise(steps: list[dict[str, float]], cpu_marks: list[dict[str, float]]) -> dict[str, float]:
    """Steady state: the mean over steps 2 … N−1. The first step pays one-off warm-ups (shown on its
    own); with ``--async-rollout`` it also fills the pipeline (G(1) and G(2) on the same weights) and
    the last step drains it (its samples were drawn during step N−1 and nothing is drawn after it), so
    each of steps 2 … N−1 does the same work, one generation and one training, in every row. CPU
    seconds per step (the whole process tree, and per kind of process) over the same steps: the CPU
    totals at the end of step 1 and at the end of step N−1, differenced."""
    later = steps[1:-1] if len(steps) > 2 else (steps[1:] or steps)

    def mean(key: str) -> float:
        values = [s[key] for s in later if key in s]
        return statistics.fmean(values) if values else float("nan")

    out = {k: mean(k) for k in ("rollout", "reward", "train", "sync", "step", "overlap", "trainer_idle",
                                "engine_idle")}
    out["tokens_per_s"] = sum(s["tokens"] for s in later) / sum(s["step"] for s in later)
    out["first_step"] = steps[0]["step"]
    out["first_loss"] = steps[0].get("loss", float("nan"))
    out["reward_mean"] = statistics.fmean(s.get("reward_mean", float("nan")) for s in steps)
    out["steps"] = len(steps)
    last = len(steps) - 2 if len(steps) > 2 else len(steps) - 1  # the mark at the end of step N−1
    if len(cpu_marks) > last >= 1:
        first, end = cpu_marks[0], cpu_marks[last]
        for kind in PROCESS_KINDS:
            out[f"cpu_{kind}"] = (end[kind] - first[kind]) / last
        out["cpu"] = sum(out[f"cpu_{kind}"] for kind in PROCESS_KINDS)
    else:
        out["cpu"] = float("nan")
    return out


def _median_summary(runs: list[dict[str, Any]]) -> dict[str, float]:
    """The median over repeated runs of every number in their summaries (and of their memory and wall time)."""
    keys = [k for k, v in runs[0]["summary"].items() if isinstance(v, (int, float))]
    out = {k: statistics.median(r["summary"].get(k, float("nan")) for r in runs) for k in keys}
    for key in ("max_process_rss_mib", "peak_tree_pss_mib", "wall_s"):
        out[key] = statistics.median(r[key] for r in runs)
    out["step_each"] = [r["summary"]["step"] for r in runs]
    return out


def _read_our_metrics(log_dir: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = []
    for r in rows:
        tokens = r["tokens_per_s"] * r["time_step_s"]  # the trainer logs Σ(prompt + response) / step time
        steps.append({"rollout": r.get("time_rollout_s", 0.0), "reward": r.get("time_reward_s", 0.0),
                      "train": r.get("time_train_s", 0.0) + r.get("time_old_logp_s", 0.0)
                      + r.get("time_ref_logp_s", 0.0),
                      "sync": r.get("time_sync_s", 0.0), "step": r["time_step_s"], "tokens": tokens,
                      "loss": r.get("loss", float("nan")), "reward_mean": r.get("reward_mean", float("nan")),
                      **{k: r[f"time_{k}_s"] for k in ("overlap", "trainer_idle", "engine_idle")
                         if f"time_{k}_s" in r}})
    return steps


# ------------------------------------------------------------------------------------- driver
def _prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The shared HF checkpoint (with tokenizer), the prompt file and the visiting order."""
    from luspo_megatron.algorithms.losses import LossConfig
    from luspo_megatron.config import load_config
    from luspo_megatron.data.dataset import PromptIterator
    from luspo_megatron.data.synthetic import make_dataset, write_jsonl
    from luspo_megatron.trainer import assets as run_assets

    num_prompts = args.steps * args.prompts
    base = work / "base.yaml"
    base.write_text(f"seed: {args.seed}\n")  # our own base, not examples/tiny_cpu.yaml (it keeps a KL reference)
    config, _ = load_config(["--config", str(base), "--synthetic-num-prompts", str(num_prompts),
                             "--synthetic-max-steps", str(args.task_steps), "--moe-aux-loss-coeff", "0"])
    assets = run_assets.prepare(config, work / "assets")
    prompts = write_jsonl(make_dataset(num_prompts, args.seed, [1.0] * args.task_steps), work / "prompts.jsonl")
    # The order our PromptIterator visits the rows (seeded permutation of epoch 0), for TRL's unshuffled sampler.
    iterator = PromptIterator(list(range(num_prompts)), args.prompts, args.seed)
    order = [i for _ in range(args.steps) for i in iterator.next_batch()]
    clips = LossConfig(name="luspo")
    return {"hf_dir": str(assets.hf_dir), "prompts": str(prompts), "order": order, "base": str(base),
            "eps_clip": clips.eps_clip, "eps_clip_high": clips.eps_clip_high}


def _our_command(args: argparse.Namespace, shared: dict[str, Any], log_dir: Path, tp: int,
                 engine: str = "local", async_rollout: bool = False) -> list[str]:
    flags = [
        "tools/train_luspo.py", "--config", shared["base"], "--hf-checkpoint", shared["hf_dir"],
        "--prompt-data", shared["prompts"], "--train-iters", str(args.steps), "--seed", str(args.seed),
        "--sft-warmup-steps", "0", "--rollout-batch-size", str(args.prompts),
        "--n-samples-per-prompt", str(args.group), "--rollout-max-response-len", str(args.max_response_len),
        "--rollout-temperature", str(args.temperature), "--loss", "luspo", "--eps-clip", str(shared["eps_clip"]),
        "--eps-clip-high", str(shared["eps_clip_high"]), "--kl-loss-coef", "0", "--lr", str(args.lr),
        "--lr-warmup-iters", "0", "--lr-decay-style", "constant", "--weight-decay", "0", "--clip-grad", "1.0",
        "--adam-beta1", "0.9", "--adam-beta2", "0.98", "--adam-eps", "1e-8", "--moe-aux-loss-coeff", "0",
        "--log-dir", str(log_dir), "--no-progress", "--tp", str(tp),
    ]
    if engine == "inprocess":
        flags += ["--rollout-engine", "inprocess", "--weight-sync", "tensor"]
    if async_rollout:
        flags += ["--async-rollout"]
    if tp == 1:
        return [sys.executable, *flags]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp), *flags]


def _machine() -> str:
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU run)"
    load = os.getloadavg()[0]
    return (f"{os.cpu_count()} CPU cores, {mem:.0f} GiB RAM, {gpu}; {platform.platform()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}; 1-min load average at start {load:.2f}")


def _trl_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("trl")


TRL_PREFIX = "TRL"
OURS_SERVER = "ours (1 process + rollout server)"
OURS_ASYNC = "ours (1 process + rollout server, --async-rollout)"
OURS_INPROCESS = "ours (1 process, --rollout-engine inprocess)"
OURS_TP2 = "ours (torchrun 2 processes, --tp 2, + rollout server)"


def _trl_name(threads: int) -> str:
    return f"{TRL_PREFIX} {_trl_version()} GRPOTrainer (1 process, {threads} thread{'s' if threads > 1 else ''})"


def _plan(args: argparse.Namespace, shared: dict[str, Any], work: Path, repeat: int) -> list[dict[str, Any]]:
    """The runs of one repeat, interleaved so that a burst of load elsewhere spreads over frameworks."""
    trl_threads = sorted({args.threads, os.cpu_count() or 1})
    trl = []
    for threads in trl_threads:
        spec = dict(shared, threads=threads, steps=args.steps, prompts_per_step=args.prompts, group=args.group,
                    max_response_len=args.max_response_len, temperature=args.temperature, lr=args.lr,
                    seed=args.seed, out_dir=str(work / "trl_out"),
                    result=str(work / f"trl_t{threads}_r{repeat}.json"),
                    progress=str(work / f"trl_t{threads}_r{repeat}.progress"))
        spec_path = work / f"trl_t{threads}_spec.json"
        spec_path.write_text(json.dumps(spec))
        trl.append({"name": _trl_name(threads), "threads": threads, "log": f"trl_t{threads}_r{repeat}",
                    "cmd": [sys.executable, str(Path(__file__).resolve()), "--trl-child", str(spec_path)],
                    "result": Path(spec["result"]), "progress": Path(spec["progress"])})
    ours = []
    for name, key, kwargs in ((OURS_SERVER, "ours_tp1", {}), (OURS_ASYNC, "ours_async", {"async_rollout": True}),
                              (OURS_INPROCESS, "ours_inprocess", {"engine": "inprocess"})):
        log_dir = work / key / f"r{repeat}"
        ours.append({"name": name, "threads": args.threads, "log": f"{key}_r{repeat}", "log_dir": log_dir,
                     "cmd": _our_command(args, shared, log_dir, 1, **kwargs), "progress": log_dir / "metrics.jsonl"})
    if not args.no_tp2:
        log_dir = work / "ours_tp2" / f"r{repeat}"
        ours.append({"name": OURS_TP2, "threads": args.threads, "log": f"ours_tp2_r{repeat}", "log_dir": log_dir,
                     "cmd": _our_command(args, shared, log_dir, 2), "progress": log_dir / "metrics.jsonl"})
    # TRL (1 thread), ours (server), TRL (all cores), ours (async), ours (in-process), ours (tp 2)
    order = [trl[0], ours[0], *trl[1:2], ours[1], *ours[2:]]
    return order + trl[2:]


def _run_one(run: dict[str, Any], env: dict[str, str], work: Path) -> dict[str, Any] | None:
    for stale in (run["progress"], run.get("result")):
        if stale is not None and stale.exists():
            stale.unlink()  # a fresh run, not a resume of an old one
    run_env = dict(env, OMP_NUM_THREADS=str(run["threads"]))
    log_path = work / f"{run['log']}.log"
    measured = _measured(run["cmd"], run_env, log_path, run["progress"])
    if measured["returncode"] != 0:
        return None
    steps = (json.loads(run["result"].read_text())["steps"] if "result" in run
             else _read_our_metrics(run["log_dir"]))
    return dict(measured, summary=_summarise(steps, measured.pop("cpu_marks")), steps=steps)


def _ratios(results: dict[str, dict[str, Any]]) -> tuple[str, dict[str, float], list[float]]:
    """TRL's best thread setting (lowest median step time); each of ours against it (medians); and the
    async row's ratio in each repeat against the best TRL of that repeat."""
    trl_names = [n for n in results if n.startswith(TRL_PREFIX)]
    best = min(trl_names, key=lambda n: results[n]["summary"]["step"])
    ratios = {name: r["summary"]["step"] / results[best]["summary"]["step"] for name, r in results.items()
              if not name.startswith(TRL_PREFIX)}
    per_repeat = []
    if OURS_ASYNC in results:
        for i, run in enumerate(results[OURS_ASYNC]["runs"]):
            trl_best = min(results[n]["runs"][i]["summary"]["step"] for n in trl_names if i < len(results[n]["runs"]))
            per_repeat.append(run["summary"]["step"] / trl_best)
    return best, ratios, per_repeat


def _fmt(value: float, digits: int = 2) -> str:
    return "—" if value != value else f"{value:.{digits}f}"  # NaN (not measured) → —


def _markdown_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines: header, rule, one line per row."""
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(row) + " |" for row in rows)]


def _table_rows(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = []
    for name, r in results.items():
        s = r["summary"]
        rows.append([name, _fmt(s["rollout"]), _fmt(s["reward"]), _fmt(s["train"]), _fmt(s["sync"]),
                     f"**{_fmt(s['step'])}**", " / ".join(_fmt(v) for v in s["step_each"]), _fmt(s["first_step"]),
                     _fmt(s["cpu"]), f"{s['tokens_per_s']:.0f}", f"{s['max_process_rss_mib']:.0f}",
                     f"{s['peak_tree_pss_mib']:.0f}", f"{s['first_loss']:.6f}", f"{s['reward_mean']:.3f}",
                     f"{s['wall_s']:.0f}"])
    return rows


HEADERS = ["framework", "rollout s", "reward s", "train s", "sync s", "step s (median)", "step s, each run",
           "first step s", "CPU-s / step", "tokens/s", "max process RSS MiB", "peak tree PSS MiB", "first-step loss",
           "reward mean", "process wall s"]


def _profile_rows(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = []
    for name, r in results.items():
        s = r["summary"]
        rows.append([name, _fmt(s["step"]), *(_fmt(s.get(f"cpu_{k}", float("nan"))) for k in PROCESS_KINDS),
                     _fmt(s["cpu"]), _fmt(s["overlap"]), _fmt(s["trainer_idle"]), _fmt(s["engine_idle"])])
    return rows


PROFILE_HEADERS = ["framework", "step s", *(f"CPU-s {k}" for k in PROCESS_KINDS), "CPU-s total", "overlap s",
                   "trainer idle s", "engine idle s"]


def _markdown(args, command: str, machine: str, date: str, results, check, best, ratios, per_repeat,
              floor: dict[str, float], took_s: float, load_end: float) -> str:
    repeats = len(next(iter(results.values()))["runs"])
    lines = [
        "# Side by side with TRL (CPU)",
        "",
        "`benchmarks/vs_trl.py` trains the same tiny Qwen3-MoE (4 layers, hidden 64, 8 experts top-2, task "
        "vocabulary; one HF checkpoint with its tokenizer, float32) on the same synthetic arithmetic prompts "
        "(the same P prompts at every step), with the same G, maximum response length, temperature, number of "
        "RL steps, LUSPO clips, β = 0, AdamW settings and one optimizer step per rollout, in TRL's "
        "`GRPOTrainer(loss_type=\"luspo\", importance_sampling_level=\"sequence\")` and in our "
        "`tools/train_luspo.py --loss luspo`: 1 process with our rollout server (the default), the same with "
        "`--async-rollout` (step n+1 generated while step n trains, docs/async.md), 1 process with "
        "`--rollout-engine inprocess --weight-sync tensor`, and `torchrun --nproc-per-node 2 ... --tp 2` with "
        "the server. Each run is its own subprocess. Ours run with `OMP_NUM_THREADS` = "
        f"{args.threads} in every process; TRL runs twice, with `torch.set_num_threads` (and `OMP_NUM_THREADS`) "
        f"= {args.threads} and = the machine's {os.cpu_count()} cores, and is compared by its best. The module "
        "docstring lists everything that is held equal.",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}.  ",
        f"Date: {date}. The whole script took {took_s:.0f} s; 1-min load average at the end {load_end:.2f}. "
        "Other jobs may share the machine (the load averages say how much; the benchmark itself keeps "
        "it near 1–2): step times can move by tens of percent between runs, which is why every row is run "
        f"{repeats} times, interleaved, and reported by its median.",
        "",
        f"Setting: {args.steps} RL steps, P = {args.prompts} prompts × G = {args.group} samples, max response "
        f"{args.max_response_len} tokens, temperature {args.temperature}, lr {args.lr}, arithmetic problems of "
        f"1–{args.task_steps} operations, seed {args.seed}.",
        "",
        "Per RL step, seconds: mean over steps 2…N−1 of one run, then the median over the runs. The first step "
        "pays one-off warm-ups (shown on its own); with `--async-rollout` it also fills the pipeline and the last "
        "step drains it (its samples were drawn during step N−1, nothing is drawn after it), so steps 2…N−1 are "
        "the ones that each do one generation and one training in every row. rollout = generation; train = "
        "log-probs, loss, backward and "
        "optimizer step (TRL: the step minus its generate-and-score call); sync = our weight push to the "
        "rollout server (TRL generates with the training model itself). With `--async-rollout` the rollout of a "
        "step runs during the previous step's training, so rollout + train + sync exceeds the step time. "
        "CPU-s / step = CPU seconds (user + system) of the whole process tree (trainer, rollout server, reward "
        "workers, launcher) from the end of step 1 to the end of step N−1, per step. tokens/s = (prompt + "
        "response tokens of the step) / step time. Max process RSS = the largest ru_maxrss of any process in "
        "the run's tree; peak tree PSS = the peak of Σ PSS over all live processes of the run, sampled every "
        "0.2 s. process wall = the whole subprocess, start-up included.",
        "",
        *_markdown_table(HEADERS, _table_rows(results)),
    ]
    async_line = ""
    if per_repeat:
        async_line = (f" The async row against the best TRL of the same repeat: "
                      f"{' / '.join(f'{v:.2f}×' for v in per_repeat)} (median {statistics.median(per_repeat):.2f}×).")
    lines += ["", f"Step-time ratios from this run, medians against TRL's best ({best}); target for the async "
              f"row: ≤ 0.7×.{async_line}", ""]
    lines += [f"- {k} / TRL best: **{v:.2f}×**" for k, v in ratios.items()]
    lines += [
        "",
        "## Where each process's time goes (the profile)",
        "",
        "CPU seconds per step by kind of process (medians over the runs; the sampler reads /proc every 0.05 s "
        "and marks the end of each step), and, for the async row, the timers the trainer logs "
        "(`time_overlap_s`: generation seconds hidden behind training; `time_trainer_idle_s`: the trainer "
        "waiting for samples or for the engines to finish before a sync; `time_engine_idle_s`: seconds with no "
        "generation in flight). On a 2-core machine a step cannot take less than its CPU-seconds / 2.",
        "",
        *_markdown_table(PROFILE_HEADERS, _profile_rows(results)),
    ]
    lines += _where_time_goes(results, best, ratios, floor)
    lines += [
        "",
        "## First-step LUSPO loss on identical inputs",
        "",
        "The first-step losses in the table come from different samples (each framework draws its own), so "
        "they are not comparable. Agreement is checked on one fixed batch without sampling "
        f"({check['sequences']} sequences of different lengths, {check['clipped_sequences']} of them clipped, "
        f"{check['dtype']}): TRL's own `GRPOTrainer._compute_loss` against our "
        "`policy_loss(LossConfig(\"luspo\"), num_sequences=B)` on a separate forward of the same model, and the "
        "written-out formula (1/B) Σ_i |y_i|·ℓ_i:",
        "",
        "| TRL `_compute_loss` | ours `policy_loss` | oracle (1/B) Σ \\|y_i\\| ℓ_i | \\|TRL − ours\\| "
        "| max \\|Δ grad\\| (of max \\|grad\\|) |",
        "|---:|---:|---:|---:|---:|",
        f"| {check['trl']:.12f} | {check['ours']:.12f} | {check['oracle']:.12f} | {check['abs_diff']:.1e} "
        f"| {check['grad_max_abs_diff']:.1e} (of {check['grad_max_abs']:.1e}) |",
        "",
        f"The remaining difference is the forward, not the loss: TRL scores with transformers' fused lm-head "
        f"log-prob path, which returns {check['trl_logps_dtype']} log-probs even for a float64 model (max "
        f"|Δ log-prob| {check['logps_max_abs_diff']:.1e} against our float64 `log_softmax`). Fed TRL's own "
        f"log-probs, our `policy_loss` gives {check['ours_on_trl_logps']:.12f}: |TRL − ours| = "
        f"{check['abs_diff_same_logps']:.1e}, max |Δ grad| = {check['grad_max_abs_diff_same_logps']:.1e}.",
        "",
        "The first-step losses of the training runs are 0 here because the runs start from the randomly "
        "initialised preset (`--sft-warmup-steps 0`, as specified): no sample earns a reward, every group is "
        "flat, Â = 0. The step still does the full forward, backward and optimizer work on both sides, so the "
        "timings are unaffected.",
        "",
        "TRL aggregates LUSPO as `(per_token_loss * mask).sum(-1).mean()` with a (B, 1) per-sequence loss: "
        "the masked sum over t gives |y_i|·ℓ_i and the mean over the B rows divides by the local batch size, "
        "i.e. (1/B) Σ_i |y_i|·ℓ_i, our formula. The two normalisers agree as long as every micro-batch holds "
        "the same number of sequences: TRL then divides by `gradient_accumulation_steps` and DDP averages "
        "over processes, which turns 1/B_local into 1/B_global exactly. TRL always splits its generation batch "
        "into equal `per_device_train_batch_size` slices, so that holds there. Our micro-batches are packed "
        "under a token budget and hold different numbers of sequences, which is why our loss takes the global B "
        "explicitly instead of a local mean. On-policy (one optimizer step per rollout, as here) both sides use "
        "π_old = sg[π_θ], so the first-step loss is −(1/B) Σ_i |y_i|·Â_i for the sampled batch.",
        "",
        "Also different, and not in the loss check: TRL's advantages divide by (std + 1e-4), ours by "
        "(std + 1e-6) (docs/design.md §2).",
    ]
    return "\n".join(lines) + "\n"


def _where_time_goes(results: dict[str, dict[str, Any]], best: str, ratios: dict[str, float],
                     floor: dict[str, float]) -> list[str]:
    """The analysis, with this run's numbers."""
    trl, ours = results[best]["summary"], results[OURS_SERVER]["summary"]
    lines = [
        "",
        "## Reading it",
        "",
        f"- **Rollout** ({ours['rollout']:.2f} s ours with the server vs {trl['rollout']:.2f} s TRL): both sample "
        "with transformers `generate` on the same float32 weights; ours in our SGLang-API server process (one "
        "`/generate` per sample, batched by the server into one `generate` call), TRL in the training process. "
        f"The decode loop alone, measured in one process on step 1's P·G rows: our server's generator "
        f"{floor['ours']:.3f} s, transformers' own sampling `generate` (what TRL calls) {floor['transformers']:.3f} s: "
        "the same floor. The rest of our rollout is the HTTP round trip, the server's batching window, JSON "
        "and the client.",
        f"- **Train** ({ours['train']:.2f} s ours vs {trl['train']:.2f} s TRL): ours is one packed (THD) micro-batch "
        "through Megatron-Core with the chunked log-prob and the fused C++ LUSPO loss, then the optimizer; TRL "
        "pads to the longest row and runs the HF Trainer step.",
        f"- **Sync** ({ours['sync']:.2f} s with the server): the new weights written as an HF checkpoint and "
        "reloaded in place by the rollout server (`--weight-sync disk`); TRL generates with the training model.",
    ]
    if OURS_ASYNC in results:
        a = results[OURS_ASYNC]["summary"]
        ratio = ratios[OURS_ASYNC]
        cycle = a["rollout"] + a["sync"]
        lines.append(
            f"- **`--async-rollout`** (step {a['step']:.2f} s, {ratio:.2f}× TRL's best): generation "
            f"({a['rollout']:.2f} s) runs in the server process while the trainer trains ({a['train']:.2f} s), so a "
            f"step costs about max(generate, train) + sync; {a['overlap']:.2f} s of generation per step was hidden "
            f"behind training, the trainer waited {a['trainer_idle']:.2f} s for samples and the engines "
            f"{a['engine_idle']:.2f} s for weights. The rollout server used {a.get('cpu_rollout server', 0):.2f} "
            f"CPU-s and the trainer {a.get('cpu_trainer', 0):.2f} CPU-s per step: two processes on two cores.")
        verdict = "meets" if ratio <= 0.7 else "misses"
        server_cpu = a.get("cpu_rollout server", float("nan"))
        own_core = server_cpu + a["sync"]
        lines.append(
            f"- **Verdict: {ratio:.2f}× TRL's best step time, which {verdict} the 0.7× target.** Generation is the "
            "longer phase here, so the async step is bounded below by the engines' cycle: one generation plus one "
            f"weight sync, which must fall between two generations ({a['rollout']:.2f} + {a['sync']:.2f} = "
            f"{cycle:.2f} s = {cycle / trl['step']:.2f}× TRL's step). The rollout server spent {server_cpu:.2f} "
            f"CPU-s per step over {a['rollout']:.2f} s of generation: it had {server_cpu / a['rollout']:.0%} of a "
            "core, the rest going to our trainer and to the other jobs on the machine. With a core of its own, "
            f"the cycle would be about {server_cpu:.2f} + {a['sync']:.2f} = {own_core:.2f} s, against TRL's step on "
            f"a core of its own, at least its {trl['cpu']:.2f} CPU-s: about {own_core / trl['cpu']:.2f}× (an estimate "
            f"from CPU time, not a measured step). 0.7× TRL is {0.7 * trl['step']:.2f} s; the decode loop "
            f"alone is {floor['ours']:.2f} s ({floor['ours'] / trl['step']:.2f}× TRL), the same loop TRL runs, and "
            "the server adds its HTTP path and batching window around it. What would close the rest, not done "
            "here: exporting the weights while the last generation finishes (only the engine's reload left "
            "between generations), and a decode loop that is not per-op Python (CUDA graphs on a GPU, as SGLang "
            "does).")
    if OURS_INPROCESS in results:
        inproc = results[OURS_INPROCESS]["summary"]
        lines.append(
            f"- **In-process rollout** (rollout {inproc['rollout']:.2f} s, sync {inproc['sync']:.3f} s, step "
            f"{inproc['step']:.2f} s): the same generator in the trainer's process, weights copied in memory; no "
            "HTTP, no second process, so nothing to overlap with (`--async-rollout` refuses it).")
    if OURS_TP2 in results:
        tp2 = results[OURS_TP2]["summary"]
        lines.append(
            f"- **`--tp 2`** (train {tp2['train']:.2f} s, sync {tp2['sync']:.2f} s): at hidden size 64 every "
            "tensor-parallel all-reduce costs more than the matmul it splits; pure overhead on this toy.")
    trl_rows = {n: r["summary"]["step_each"] for n, r in results.items() if n.startswith(TRL_PREFIX)}
    lines.append("- **TRL's threads**: " + "; ".join(f"{n}: {' / '.join(f'{v:.2f}' for v in each)} s"
                                                    for n, each in trl_rows.items())
                 + f". The best median ({best}) is the reference. The ops are small enough that a second thread "
                 "gains little, and on a loaded machine an OpenMP thread that spin-waits for a descheduled partner "
                 "can stall a step for seconds.")
    lines.append("- **CPU-seconds** count every process of the run, so a framework that spreads its work over "
                 "two processes is not credited with the second core for free: compare the CPU-s column with the "
                 "step time.")
    return lines


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 RL steps, 4 prompts × G=4, 32 tokens")
    parser.add_argument("--steps", type=int, default=None, help="RL steps (default 6; quick 5)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per step P (default 8; quick 4)")
    parser.add_argument("--group", type=int, default=None, help="samples per prompt G (default 8; quick 4)")
    parser.add_argument("--max-response-len", type=int, default=None, help="tokens (default 64; quick 32)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--task-steps", type=int, default=2, help="hardest arithmetic level (operations)")
    parser.add_argument("--repeat", type=int, default=1, help="run every row this many times; report medians")
    parser.add_argument("--no-tp2", action="store_true", help="skip the 2-process torchrun --tp 2 run")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "vs_trl")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "bench" / "vs_trl.md",
                        help="markdown report; '-' to skip writing it")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite --output from <workdir>/results.json (no runs)")
    parser.add_argument("--trl-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = {"steps": 5, "prompts": 4, "group": 4, "max_response_len": 32}
    full = {"steps": 6, "prompts": 8, "group": 8, "max_response_len": 64}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.repeat < 1:
        parser.error(f"--repeat: expected ≥ 1, got {args.repeat}")
    args.threads = int(os.environ.get("OMP_NUM_THREADS", "") or 1)
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.trl_child:
        _trl_child(args.trl_child)
        return 0
    if args.render:
        _write_markdown(args, args.workdir / "results.json")
        return 0
    if importlib.util.find_spec("trl") is None:
        print(f"vs_trl: error: TRL is not installed; {INSTALL_HINT}", file=sys.stderr)
        return 2
    from rich.console import Console
    from rich.table import Table

    console = Console(width=240)  # the table is wide; do not wrap it in a pipe or CI log
    began = time.perf_counter()
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    machine = _machine()
    command = "OMP_NUM_THREADS={} python benchmarks/vs_trl.py {}".format(
        args.threads, " ".join(a for a in (argv if argv is not None else sys.argv[1:])))
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))

    console.print("[bold]loss on a fixed batch[/bold] (TRL _compute_loss vs our policy_loss, float64)")
    check = loss_on_fixed_batch()
    console.print(f"  TRL {check['trl']:.12f}   ours {check['ours']:.12f}   oracle {check['oracle']:.12f}   "
                  f"|Δ| {check['abs_diff']:.1e}   max |Δ grad| {check['grad_max_abs_diff']:.1e}   "
                  f"clipped {check['clipped_sequences']}/{check['sequences']}")
    if not (check["abs_diff"] < 1e-4 and check["grad_max_abs_diff"] < 1e-4):
        console.print("[red]the first-step LUSPO losses disagree by more than 1e-4[/red]")

    shared = _prepare(args, work)
    floor = generation_floor(shared, args)
    console.print(f"generation floor (decode loop alone, P·G rows): ours {floor['ours']:.3f} s, transformers "
                  f"generate {floor['transformers']:.3f} s")
    runs: dict[str, list[dict[str, Any]]] = {}
    for repeat in range(args.repeat):
        for run in _plan(args, shared, work, repeat):
            console.print(f"[bold]{run['name']}[/bold] (repeat {repeat + 1}/{args.repeat}): running "
                          f"({args.steps} steps, load {os.getloadavg()[0]:.1f}) …")
            result = _run_one(run, env, work)
            if result is None:
                console.print(f"[red]{run['name']} failed; see {work / (run['log'] + '.log')}[/red]")
                return 1
            runs.setdefault(run["name"], []).append(result)
            console.print(f"  step {result['summary']['step']:.3f} s, CPU {result['summary']['cpu']:.3f} s / step")
    order = [n for n in runs if n.startswith(TRL_PREFIX)] + [n for n in runs if not n.startswith(TRL_PREFIX)]
    results = {name: {"runs": runs[name], "summary": _median_summary(runs[name])} for name in order}
    best, ratios, per_repeat = _ratios(results)

    table = Table(title=f"vs TRL: {args.steps} RL steps, P={args.prompts} × G={args.group}, "
                        f"max response {args.max_response_len}, medians of {args.repeat} run(s)")
    for header in HEADERS:
        table.add_column(header, justify="left" if header == "framework" else "right")
    for row in _table_rows(results):
        table.add_row(*row)
    console.print(table)
    for key, value in ratios.items():
        console.print(f"{key} / {best}: {value:.2f}×  (target for the async row ≤ 0.7×)")
    if per_repeat:
        console.print("async / best TRL of the same repeat: " + " ".join(f"{v:.2f}×" for v in per_repeat))
    took = time.perf_counter() - began
    console.print(f"total {took:.0f} s")
    meta = {"args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))},
            "command": command, "machine": machine, "date": date, "took_s": took, "load_end": os.getloadavg()[0]}
    (work / "results.json").write_text(json.dumps(
        {"results": results, "check": check, "best_trl": best, "ratios": ratios, "async_per_repeat": per_repeat,
         "generation_floor": floor, "meta": meta}, indent=1))
    _write_markdown(args, work / "results.json")
    return 0


def _write_markdown(args: argparse.Namespace, results_path: Path) -> None:
    """docs/bench/vs_trl.md (``--output``) from a results.json this script wrote (``--render`` redoes it)."""
    if str(args.output) == "-":
        return
    saved = json.loads(results_path.read_text())
    meta = saved["meta"]
    run_args = argparse.Namespace(**meta["args"])
    results = saved["results"]
    best, ratios, per_repeat = _ratios(results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(_markdown(run_args, meta["command"], meta["machine"], meta["date"], results,
                                     saved["check"], best, ratios, per_repeat, saved["generation_floor"],
                                     meta["took_s"], meta["load_end"]))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    sys.exit(main())
