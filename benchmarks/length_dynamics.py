"""Length dynamics of GRPO, GSPO and LUSPO at toy scale (the paper's central claim; issue 8 §1).

The LUSPO paper reports that under GSPO the mean response length shrinks during RL, while under
LUSPO it keeps growing. The mechanism (docs/design.md §2): GSPO averages one sequence-level term per
response, so a response's per-token gradient weight is ∝ 1/|y_i|, which favours short responses
for positive advantages less than long ones are penalised for negative ones; LUSPO multiplies each
term by |y_i|, which removes the 1/|y_i|.

Setup, everything held equal except ``--loss``:

* one shared starting checkpoint: a single SFT warm-up run of the embedded default
  (``examples/tiny_cpu.yaml``) whose ``hf_after_sft`` directory every RL run loads with
  ``--hf-checkpoint``; the warm-up mixes worked, line-per-operation solutions with bare
  ``\\boxed{}`` answers (``--sft-direct-fraction``), so the policy starts with both a long and a
  short way to answer, and RL decides which one grows;
* the synthetic chained-arithmetic task (``luspo_megatron/data/synthetic.py``), where writing
  one line per operation makes a right answer more likely: length can pay;
* for each seed, the same data order, rollout batch, group size, steps and learning rate; the
  clip ranges are each loss's own defaults (docs/design.md §2), as in the papers.

Writes ``docs/length_dynamics.png`` (mean response length, accuracy and reward per step; one curve
per loss, band = ± one std across seeds) and ``docs/bench/length_dynamics.md`` (final length and
accuracy, mean ± std across seeds). ``--quick`` is the ~5-minute version ``make bench`` runs.

    python benchmarks/length_dynamics.py            # full: 3 seeds x 3 losses, < 60 min on 2 cores
    python benchmarks/length_dynamics.py --quick
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "tools" / "train_luspo.py"
LOSSES = ("grpo", "gspo", "luspo")
CURVES = (("response_len_mean", "mean response length (tokens)"), ("accuracy", "accuracy"),
          ("reward_mean", "reward"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the ~5-minute version: 2 seeds, fewer steps")
    p.add_argument("--seeds", type=int, default=None, help="seeds per loss (default 3; quick 2)")
    p.add_argument("--steps", type=int, default=None, help="RL steps per run (default 60; quick 8)")
    p.add_argument("--sft-steps", type=int, default=None, help="shared SFT warm-up steps (default 600; quick 150)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each is a trainer + its rollout server)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "length_dynamics", help="run directories")
    p.add_argument("--figure", type=Path, default=None,
                   help="default docs/length_dynamics.png (--quick: docs/bench/length_dynamics_quick.png)")
    p.add_argument("--report", type=Path, default=None,
                   help="default docs/bench/length_dynamics.md (--quick: docs/bench/length_dynamics_quick.md)")
    p.add_argument("train_args", nargs=argparse.REMAINDER,
                   help="after --: extra tools/train_luspo.py flags, given to every run")
    args = p.parse_args(argv)
    args.seeds = args.seeds or (2 if args.quick else 3)
    args.steps = args.steps or (8 if args.quick else 60)
    args.sft_steps = args.sft_steps or (150 if args.quick else 600)
    args.train_args = [a for a in args.train_args if a != "--"]
    # The quick version never overwrites the full experiment's figure and table.
    suffix = "_quick" if args.quick else ""
    args.figure = args.figure or (ROOT / "docs" / "bench" / "length_dynamics_quick.png" if args.quick
                                  else ROOT / "docs" / "length_dynamics.png")
    args.report = args.report or ROOT / "docs" / "bench" / f"length_dynamics{suffix}.md"
    return args


# The task and batch every run shares (on top of examples/tiny_cpu.yaml, which gives the RL prompt
# pool of 128 and the warm-up pool of 4096). One- and two-operation chains: on two operations the
# worked line-per-operation answer can beat the bare one, so length can pay.
COMMON = ["--synthetic-max-steps", "2", "--rollout-batch-size", "16", "--n-samples-per-prompt", "8",
          "--lr", "3e-4", "--rollout-max-response-len", "64",
          "--num-steps-per-rollout", "1"]  # on-policy, as measured (examples/tiny_cpu.yaml now has 2)


def train(log_dir: Path, flags: list[str]) -> Path:
    """One tools/train_luspo.py run; its output goes to log_dir/stdout.log. Returns log_dir."""
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(TRAIN), *flags, "--log-dir", str(log_dir), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with (log_dir / "stdout.log").open("w") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if code != 0:
        tail = (log_dir / "stdout.log").read_text().strip().splitlines()[-1:]
        raise SystemExit(f"length_dynamics: run {log_dir.name} failed (exit {code}): {' '.join(tail)}; "
                         f"command: {shlex.join(cmd)}")
    return log_dir


def read_metrics(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def per_step(runs: list[list[dict]], key: str) -> tuple[list[float], list[float]]:
    """Mean and (sample) std across seeds of ``key`` at each step."""
    steps = min(len(r) for r in runs)
    means, stds = [], []
    for i in range(steps):
        values = [r[i][key] for r in runs]
        means.append(statistics.fmean(values))
        stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
    return means, stds


def window_mean(run: list[dict], key: str, first: bool, width: int) -> float:
    part = run[:width] if first else run[-width:]
    return statistics.fmean(m[key] for m in part)


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {std:.3f}"


def table(results: dict[str, list[list[dict]]], width: int) -> str:
    head = (f"| loss | length, first {width} steps | length, last {width} steps | last / first | "
            f"accuracy, first {width} | accuracy, last {width} | clip fraction (mean) |")
    rows = [head, "|" + "---|" * 7]
    for loss, runs in results.items():
        l0 = [window_mean(r, "response_len_mean", True, width) for r in runs]
        l1 = [window_mean(r, "response_len_mean", False, width) for r in runs]
        a0 = [window_mean(r, "accuracy", True, width) for r in runs]
        a1 = [window_mean(r, "accuracy", False, width) for r in runs]
        clip = [statistics.fmean(m.get("clip_frac", 0.0) for m in r) for r in runs]
        ratio = [b / a for a, b in zip(l0, l1)]
        rows.append(f"| {loss} | {mean_std(l0)} | {mean_std(l1)} | {mean_std(ratio)} | {mean_std(a0)} | "
                    f"{mean_std(a1)} | {mean_std(clip)} |")
    return "\n".join(rows)


def plot(results: dict[str, list[list[dict]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.8))
    for ax, (key, label) in zip(axes, CURVES):
        for loss, runs in results.items():
            mean, std = per_step(runs, key)
            x = range(1, len(mean) + 1)
            ax.plot(x, mean, label=loss)
            ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
        ax.set_xlabel("RL step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def machine() -> str:
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, {mem_gib:.0f} GiB RAM, no GPU, "
            f"Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    common = COMMON + args.train_args
    sft_dir = args.out / "sft"
    print(f"[length_dynamics] shared SFT warm-up: {args.sft_steps} steps -> {sft_dir}", flush=True)
    # One RL step is the least the trainer runs; its weights are not used, only hf_after_sft.
    train(sft_dir, common + ["--sft-warmup-steps", str(args.sft_steps), "--sft-direct-fraction", "0.5",
                             "--train-iters", "1", "--seed", "0"])
    start = sft_dir / "assets" / "hf_after_sft"
    jobs = [(loss, seed) for seed in range(1, args.seeds + 1) for loss in LOSSES]
    print(f"[length_dynamics] {len(jobs)} RL runs of {args.steps} steps, {args.jobs} at a time", flush=True)

    def run(job: tuple[str, int]) -> Path:
        loss, seed = job
        log_dir = train(args.out / f"{loss}-seed{seed}", common + [
            "--hf-checkpoint", str(start), "--sft-warmup-steps", "0", "--loss", loss, "--seed", str(seed),
            "--train-iters", str(args.steps)])
        print(f"[length_dynamics] done: {log_dir.name}", flush=True)
        return log_dir

    with ThreadPoolExecutor(args.jobs) as pool:
        dirs = dict(zip(jobs, pool.map(run, jobs)))
    results = {loss: [read_metrics(dirs[(loss, s)]) for s in range(1, args.seeds + 1)] for loss in LOSSES}
    width = max(1, min(10, args.steps // 4))
    minutes = (time.perf_counter() - started) / 60
    command = "python benchmarks/length_dynamics.py" + (" --quick" if args.quick else "") + \
        (" -- " + shlex.join(args.train_args) if args.train_args else "")
    title = (f"tiny Qwen3-MoE, chained arithmetic; {args.seeds} seeds, {args.steps} RL steps, "
             f"shared {args.sft_steps}-step SFT start; band = ±1 std")
    plot(results, args.figure, title)
    body = table(results, width)
    report = "\n".join([
        "# Length dynamics: GRPO vs GSPO vs LUSPO (generated by benchmarks/length_dynamics.py)", "",
        f"- Command: `{command}`",
        f"- Machine: {machine()}",
        f"- Date: {datetime.date.today().isoformat()}; wall time {minutes:.1f} min",
        f"- Setup: examples/tiny_cpu.yaml + `{shlex.join(common)}`; shared SFT start "
        f"({args.sft_steps} steps, half the targets bare answers); "
        f"{args.seeds} seeds x {args.steps} RL steps per loss.",
        f"- Figure: `{args.figure.relative_to(ROOT) if args.figure.is_relative_to(ROOT) else args.figure}`",
        "", "Mean ± std across seeds; per seed, the mean over the first / last "
        f"{width} RL steps.", "", body, ""])
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
