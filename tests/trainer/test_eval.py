"""Held-out evaluation end to end (trainer/evaluate.py, tools/eval.py), and the plain progress lines
of tools/train_luspo.py when stdout is a file.

One run of the tiny model (4 RL steps, in-process engine, two eval sets: JSONL and Parquet,
``--eval-interval 2``, k = 4) serves most checks. The oracles, all in float64 from the run's own
``eval_samples.jsonl``:

- correct = the run's reward > 0; the reward is ``tests.trainer.rewards:digit_fraction`` (the share
  of digits), so a sample is correct iff its decoded response holds a digit, recomputed here;
- avg@k = mean over prompts of c/k; pass@k' = the fraction of the C(k, k') k'-subsets of a prompt's
  samples that hold a correct one, enumerated with itertools (not the product formula of
  algorithms/passk.py), averaged over prompts;
- response_len_mean and truncation_rate: plain means of the rows.

A second run at lr 1e-30 (the config asks lr > 0; no fp32 weight moves: |Δw| ≈ lr ≪ ulp(w)) must
log the same numbers and the same samples at every evaluation: the sampling seeds depend on (seed,
data set, prompt, sample), never on the step. tools/eval.py on the first run's checkpoint must
repeat that run's last evaluation exactly.
"""

from __future__ import annotations

import importlib.util
import io
import itertools
import json
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from tests.trainer.test_train_luspo import ROOT, TINY, _env, rows

K = 4
EVAL_LEN = 20
EVAL = ["--n-samples-per-eval-prompt", str(K), "--eval-max-response-len", str(EVAL_LEN),
        "--rollout-engine", "inprocess", "--weight-sync", "tensor"]


def _eval_files(directory: Path) -> tuple[Path, Path]:
    """Held-out arithmetic problems (another seed than the run's): 6 as JSONL, 3 as Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from luspo_megatron.data.synthetic import make_dataset

    held_out = make_dataset(9, 99, [1.0] * 8)
    jsonl, parquet = directory / "toy.jsonl", directory / "more.parquet"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in held_out[:6]))
    verl = [{"data_source": r["data_source"], "prompt": r["prompt"], "ability": "math",  # the verl columns
             "reward_model": {"style": "rule", "ground_truth": str(r["reward_model"]["ground_truth"])}}
            for r in held_out[6:]]
    pq.write_table(pa.Table.from_pylist(verl), parquet)
    return jsonl, parquet


def _train(log_dir: Path, *flags: str) -> str:
    """tools/train_luspo.py with its progress on (TINY turns it off), stdout to a file; returns it."""
    args = [a for a in TINY if a != "--no-progress"] + ["--log-dir", str(log_dir), *flags]
    out = log_dir / "stdout.txt"
    log_dir.mkdir(parents=True, exist_ok=True)
    with out.open("w") as stdout:  # `tools/train_luspo.py ... > file`
        proc = subprocess.run([sys.executable, str(ROOT / "tools" / "train_luspo.py"), *args], cwd=ROOT,
                              env=_env(), stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out.read_text()


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory):
    return _eval_files(tmp_path_factory.mktemp("eval_data"))


@pytest.fixture(scope="module")
def run(tmp_path_factory, eval_files):
    """4 steps at lr 1e-3, evaluation at steps 0, 2, 4, a checkpoint at the end."""
    log_dir = tmp_path_factory.mktemp("eval_run")
    toy, more = eval_files
    stdout = _train(log_dir, "--train-iters", "4", "--eval-data", f"toy={toy}", "--eval-data", f"more={more}",
                    "--eval-interval", "2", *EVAL, "--save", str(log_dir / "ckpt"))
    return log_dir, stdout


def _eval_keys(row: dict) -> dict:
    return {k: v for k, v in row.items() if k.startswith("eval/")}


def _expected(samples: list[dict]) -> dict[str, float]:
    """The metrics of one data set at one step from its sample rows, in exact / float64 arithmetic."""
    by_prompt: dict[int, list[dict]] = {}
    for s in samples:
        by_prompt.setdefault(s["prompt_index"], []).append(s)
    assert all(sorted(s["sample_index"] for s in group) == list(range(K)) for group in by_prompt.values())
    hits = [[s["correct"] for s in group] for group in by_prompt.values()]
    out = {f"avg@{K}": float(sum(Fraction(sum(h), K) for h in hits) / len(hits))}
    for kk in (1, 2, 4):
        per_prompt = [Fraction(sum(any(h[i] for i in subset) for subset in itertools.combinations(range(K), kk)),
                               len(list(itertools.combinations(range(K), kk)))) for h in hits]
        out[f"pass@{kk}"] = float(sum(per_prompt) / len(per_prompt))
    out["response_len_mean"] = float(Fraction(sum(s["length"] for s in samples), len(samples)))
    out["truncation_rate"] = float(Fraction(sum(s["finish"] == "length" for s in samples), len(samples)))
    return out


def test_logged_avg_and_pass_at_k_equal_an_enumeration_over_the_eval_samples(run, eval_files):
    log_dir, _ = run
    metrics, samples = rows(log_dir), rows(log_dir, "eval_samples.jsonl")
    assert [r["step"] for r in metrics] == [0, 1, 2, 3, 4]  # step 0: the evaluation before training
    assert set(metrics[0]) == {"step", "time_eval_s", *_eval_keys(metrics[0])}
    assert [r["step"] for r in metrics if _eval_keys(r)] == [0, 2, 4]
    mixed = 0
    for row in (r for r in metrics if _eval_keys(r)):
        for name, size in (("toy", 6), ("more", 3)):
            mine = [s for s in samples if s["step"] == row["step"] and s["dataset"] == name]
            assert len(mine) == size * K
            for s in mine:  # correct is the run's reward > 0: a digit in the response
                digits = sum(ch.isdigit() for ch in s["response"])
                assert s["reward"] == pytest.approx(digits / max(1, len(s["response"])), abs=1e-12)
                assert s["correct"] == (digits > 0)
                assert s["finish"] in ("stop", "length") and (s["finish"] == "length") == (s["length"] == EVAL_LEN)
            for key, value in _expected(mine).items():
                assert row[f"eval/{name}/{key}"] == pytest.approx(value, rel=1e-12, abs=1e-15), (row["step"], key)
            groups = [sum(s["correct"] for s in mine if s["prompt_index"] == p) for p in range(size)]
            mixed += sum(0 < c < K for c in groups)
    assert mixed > 0  # some prompt is neither all right nor all wrong: pass@k and avg@k are not trivially equal
    prompts = [json.loads(line)["prompt"] for line in eval_files[0].read_text().splitlines()]
    assert [s["prompt"] for s in samples if s["dataset"] == "toy" and s["sample_index"] == 0][:6] == prompts


def test_the_summary_table_and_curves_read_training_steps_only(run):
    """The step-0 evaluation row is not a training step: the run's summary (first/last window) is what
    the training rows alone give, and the eval curves are drawn beside the training ones."""
    from rich.console import Console

    from luspo_megatron.logging import eval_curves, summary_table

    log_dir, stdout = run
    metrics = rows(log_dir)
    training = [{k: v for k, v in r.items() if not k.startswith("eval/") and k != "time_eval_s"}
                for r in metrics[1:]]

    def cells(table) -> list[tuple[str, ...]]:  # the table's body rows as (metric, first, last)
        console = Console(width=200, record=True, file=io.StringIO())
        console.print(table)
        lines = console.export_text().splitlines()
        return [tuple(c.strip() for c in line.strip("│").split("│")) for line in lines if line.startswith("│")]

    with_eval, without = cells(summary_table(metrics)), cells(summary_table(training))
    assert len(without) == 8 and with_eval[:8] == without  # every training row, unchanged
    assert [c[0] for c in with_eval[8:]] == ["eval/more/avg@4", "eval/more/response_len_mean", "eval/toy/avg@4",
                                             "eval/toy/response_len_mean"]
    first, last = metrics[0]["eval/toy/avg@4"], metrics[-1]["eval/toy/avg@4"]
    assert with_eval[10][1:] == (f"{first:.4g}", f"{last:.4g}")
    assert [k for k, _ in eval_curves({"run": metrics})] == [
        "eval/more/avg@4", "eval/more/response_len_mean", "eval/toy/avg@4", "eval/toy/response_len_mean"]
    assert (log_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "eval/toy/avg@4" in stdout  # the end-of-run summary printed it


def test_plot_runs_draws_a_chosen_eval_curve_and_rejects_one_no_run_logged(run, tmp_path):
    spec = importlib.util.spec_from_file_location("plot_runs", ROOT / "tools" / "plot_runs.py")
    plot_runs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_runs)
    log_dir, _ = run
    out = tmp_path / "cmp.png"
    assert plot_runs.main([str(log_dir), "--curves", "eval/toy/pass@2", "response_len_mean", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert plot_runs.main([str(log_dir), "--curves", "eval/toy/pass@64", "--out", str(out)]) == 2


def test_progress_lines_reach_stdout_when_it_is_a_file(run):
    _, stdout = run
    lines = re.findall(r"^RL step (\d+)/4  reward \S+  len \S+  clip \S+  step \S+s  ETA \d+:\d\d:\d\d$", stdout,
                       flags=re.MULTILINE)
    assert lines == ["1", "2", "3", "4"]


def test_evaluation_at_lr_zero_gives_the_same_numbers_and_samples_at_every_interval(run, eval_files, tmp_path):
    toy, more = eval_files
    _train(tmp_path, "--train-iters", "2", "--lr", "1e-30", "--eval-data", f"toy={toy}", "--eval-data",
           f"more={more}", "--eval-interval", "1", *EVAL)
    evals = [_eval_keys(r) for r in rows(tmp_path)]
    assert len(evals) == 3 and evals[0] and evals[0] == evals[1] == evals[2]  # steps 0, 1, 2
    samples = rows(tmp_path, "eval_samples.jsonl")
    per_step = [[{k: v for k, v in s.items() if k != "step"} for s in samples if s["step"] == step]
                for step in (0, 1, 2)]
    assert per_step[0] and per_step[0] == per_step[1] == per_step[2]
    # Before training both runs hold the same initial weights: same seeds, same evaluation.
    assert evals[0] == _eval_keys(rows(run[0])[0])


def test_tools_eval_on_the_checkpoint_repeats_the_runs_last_evaluation(run, tmp_path):
    log_dir, _ = run
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "eval.py"), "--config", str(log_dir / "config.yaml"),
                           "--load", str(log_dir / "ckpt"), "--out", str(out)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    last = rows(log_dir)[-1]
    assert result["step"] == last["step"] == 4
    assert _eval_keys(result["metrics"]) == _eval_keys(last)
    ours = rows(out.parent, "eval.samples.jsonl")
    theirs = [s for s in rows(log_dir, "eval_samples.jsonl") if s["step"] == 4]
    assert ours == theirs
    assert "toy" in proc.stdout and "pass@4" in proc.stdout  # the table


@pytest.mark.parametrize("args,needle", [
    (["--hf-checkpoint", "/nonexistent"], "--eval-data"),
    (["--eval-data", "toy=/nonexistent.jsonl"], "--load"),
    (["--eval-data", "toy"], "--eval-data"),
    (["--eval-data", "toy=/x.jsonl", "--load", "/nonexistent/ckpt"], "--load"),
])
def test_tools_eval_bad_input_is_one_line_and_exit_status_2(args, needle, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "eval.py"), "--log-dir", str(tmp_path), *args],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_the_evaluation_schedule_and_what_a_fresh_or_resumed_run_keeps(tmp_path):
    from luspo_megatron.logging import MetricsLogger, read_metrics
    from luspo_megatron.trainer.evaluate import eval_due, trim_jsonl

    assert [s for s in range(8) if eval_due(s, 3, 7)] == [0, 3, 6, 7]
    assert [s for s in range(8) if eval_due(s, None, 7)] == [0, 7]
    samples = tmp_path / "eval_samples.jsonl"
    samples.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in (0, 0, 2, 4)) + '{"step": 6, "x')
    trim_jsonl(samples, 2)  # resumed from step 2: the later evaluations (and a torn line) go
    assert [json.loads(line)["step"] for line in samples.read_text().splitlines()] == [0, 0, 2]
    trim_jsonl(samples, 0)  # a fresh run keeps nothing
    assert samples.read_text() == ""
    log = MetricsLogger(tmp_path)
    for step in (0, 1, 2, 3):
        log.log(step, {"eval/toy/avg@4": 0.5} if step == 0 else {"loss": float(step)})
    log.close()
    MetricsLogger(tmp_path, resume_step=2).close()  # resumed: the step-0 evaluation stays
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2]
    MetricsLogger(tmp_path, resume_step=0).close()  # the trainer's fresh run: an old step-0 row goes too
    assert read_metrics(tmp_path / "metrics.jsonl") == []
