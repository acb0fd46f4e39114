"""Run logging: metrics.jsonl, TensorBoard (+ wandb when installed), samples, progress (a bar on a
terminal, plain lines elsewhere), plots.

Only rank 0 logs. ``metrics.jsonl`` has one JSON object per RL step; on resume the file is cut
back to the resumed step, then appended, so a resumed run reads like an uninterrupted one. Held-out
evaluation (``--eval-data``) adds its ``eval/NAME/...`` keys to the row of the step it ran after,
and the evaluation before training is a row of its own, ``{"step": 0, "eval/...": ...}``: the
summary table and the training curves skip such eval-only rows, so they read the same with or
without evaluation.
"""

from __future__ import annotations

import json
import logging as _stdlib_logging
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

logger = _stdlib_logging.getLogger("luspo_megatron")

# Curves drawn at the end of a run and by tools/plot_runs.py: (metric key, axis title).
CURVES = (("reward_mean", "reward"), ("response_len_mean", "response length (tokens)"), ("clip_frac", "clip fraction"))
EVAL_PREFIX = "eval/"  # eval/NAME/avg@k, eval/NAME/pass@k', eval/NAME/response_len_mean, ... (trainer/evaluate.py)
_EVAL_ONLY_KEYS = ("step", "time_eval_s")


def is_eval_only(row: Mapping[str, Any]) -> bool:
    """A metrics row with evaluation results and no training step (the evaluation before step 1)."""
    return all(key in _EVAL_ONLY_KEYS or key.startswith(EVAL_PREFIX) for key in row)


def eval_curves(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[tuple[str, str]]:
    """(key, title) of the evaluation curves present in any run: avg@k and response length per data set."""
    keys = {key for rows in runs.values() for row in rows for key in row if key.startswith(EVAL_PREFIX)}
    wanted = sorted(k for k in keys if k.rsplit("/", 1)[-1].startswith("avg@") or k.endswith("/response_len_mean"))
    titles = {"response_len_mean": "response length"}
    return [(key, "eval " + " ".join(titles.get(part, part) for part in key.split("/")[1:])) for key in wanted]


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl (a torn last line, from a crash mid-write, is ignored)."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


class MetricsLogger:
    """metrics.jsonl + TensorBoard (+ wandb). ``resume_step``: keep rows with step ≤ it, drop the rest."""

    def __init__(self, log_dir: str | Path, resume_step: int | None = None, wandb_project: str | None = None,
                 run_config: Mapping[str, Any] | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.log_dir / "metrics.jsonl"
        # resume_step 0 or None: a fresh run, nothing kept (an old run's step-0 evaluation included).
        kept = [r for r in read_metrics(self.path) if resume_step and r.get("step", 0) <= resume_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)  # atomic: a crash here leaves either the old or the trimmed file
        self._file = self.path.open("a")
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=str(self.log_dir / "tensorboard"),
                                 purge_step=resume_step + 1 if resume_step else 0)
        self._wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                logger.warning("--wandb-project given but wandb is not installed; logging to TensorBoard only")
            else:
                self._wandb = wandb.init(project=wandb_project, config=dict(run_config or {}), resume="allow")

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        row = {"step": step, **{k: _json_safe(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(dict(metrics), step=step)

    def close(self) -> None:
        self._file.close()
        self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class SampleLogger:
    """A few prompt / response / reward triples every N steps, to samples.jsonl (``per_step=-1``: all)."""

    def __init__(self, log_dir: str | Path, every: int, per_step: int = 3) -> None:
        self.path = Path(log_dir) / "samples.jsonl"
        self.every = every
        self.per_step = per_step

    def maybe_log(self, step: int, samples: Iterable[Mapping[str, Any]]) -> None:
        if step % self.every != 0:
            return
        with self.path.open("a") as f:
            for i, sample in enumerate(samples):
                if 0 <= self.per_step <= i:
                    break
                f.write(json.dumps({"step": step, **sample}) + "\n")


class Progress:
    """Per-step progress on rank 0: a rich bar on a terminal, plain lines elsewhere.

    The bar (step, reward, response length, loss, ETA) is drawn when ``stream`` (default stdout,
    where the bar and the end-of-run summary always went) is a terminal. When it is not (``make
    demo > log``, CI, ``nohup``, a cluster's job log) a bar would print nothing until the end, so one
    line is written every ``log_interval`` steps and at the last step::

        RL step 12/100  reward 0.5312  len 812.4  clip 0.0123  step 3.21s  ETA 0:04:42

    The ETA is (steps left) × (mean step time so far): ``time_step_s`` of the metrics when given,
    else the wall time between updates.
    """

    def __init__(self, total: int, start: int = 0, enabled: bool = True, log_interval: int = 1,
                 stream: TextIO | None = None) -> None:
        if log_interval < 1:
            raise ValueError(f"log_interval: expected ≥ 1, got {log_interval}")
        self.total, self.step, self.log_interval = total, start, log_interval
        self._stream = stream if stream is not None else sys.stdout
        self._bar = None
        self._lines = False
        self._step_times: list[float] = []
        self._last = time.monotonic()
        if not enabled:
            return
        isatty = getattr(self._stream, "isatty", None)
        if not (callable(isatty) and isatty()):
            self._lines = True
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(
            TextColumn("[bold]RL step"), MofNCompleteColumn(), BarColumn(),
            TextColumn("reward {task.fields[reward]}  len {task.fields[length]}  loss {task.fields[loss]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=Console(file=self._stream),
        )
        self._task = self._bar.add_task("train", total=total, completed=start, reward="-", length="-", loss="-")
        self._bar.start()

    def update(self, metrics: Mapping[str, Any]) -> None:
        now = time.monotonic()
        seconds = metrics.get("time_step_s")
        self._step_times.append(float(seconds) if isinstance(seconds, (int, float)) else now - self._last)
        self._last = now
        self.step += 1
        fmt = lambda key, spec: format(metrics[key], spec) if isinstance(metrics.get(key), (int, float)) else "-"
        if self._bar is not None:
            self._bar.update(self._task, advance=1, reward=fmt("reward_mean", ".3f"),
                             length=fmt("response_len_mean", ".1f"), loss=fmt("loss", ".4g"))
        if self._lines and (self.step % self.log_interval == 0 or self.step >= self.total):
            eta_s = max(self.total - self.step, 0) * (sum(self._step_times) / len(self._step_times))
            self._stream.write(
                f"RL step {self.step}/{self.total}  reward {fmt('reward_mean', '.4f')}  "
                f"len {fmt('response_len_mean', '.1f')}  clip {fmt('clip_frac', '.4f')}  "
                f"step {self._step_times[-1]:.2f}s  ETA {_hms(eta_s)}\n")
            self._stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _hms(seconds: float) -> str:
    """3725.4 -> "1:02:05" (rounded to the second)."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def curve_points(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, skipping steps where it is missing or not finite."""
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def plot_runs(runs: Mapping[str, Sequence[Mapping[str, Any]]], out_png: str | Path,
              curves: Sequence[tuple[str, str]] | None = None) -> Path:
    """Overlay the metric curves of several runs ({label: metrics rows}) into one PNG. ``curves``
    None: :data:`CURVES`, then the evaluation curves the runs have (:func:`eval_curves`), three a row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = list(CURVES) + eval_curves(runs) if curves is None else list(curves)
    ncols = min(3, len(curves))
    nrows = -(-len(curves) // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.4 * nrows), squeeze=False)
    axes = grid.flatten()
    for ax, (key, title) in zip(axes, curves):
        for label, rows in runs.items():
            steps, values = curve_points(rows, key)
            if steps:  # evaluations are sparse: mark each point
                ax.plot(steps, values, label=label, marker="o" if key.startswith(EVAL_PREFIX) else None)
        ax.set_xlabel("RL step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    for ax in axes[len(curves):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def summary_table(rows: Sequence[Mapping[str, Any]], keys: Sequence[str] = ("reward_mean", "response_len_mean",
                  "clip_frac", "loss", "grad_norm", "kl", "entropy", "time_step_s"), window: int = 10) -> Any:
    """A rich Table: the mean of each metric over the first and the last ``window`` RL steps (eval-only
    rows do not count as steps); then, when the run evaluated, each data set's avg@k and response
    length at the first and the last evaluation."""
    from rich.table import Table

    evals = eval_curves({"run": rows})
    title = f"run summary (mean of the first / last {window} steps)"
    table = Table(title=title + ("; eval/: the first / last evaluation" if evals else ""))
    for col in ("metric", "first", "last"):
        table.add_column(col, justify="right" if col != "metric" else "left")

    def mean(part: Sequence[Mapping[str, Any]], key: str) -> str:
        vals = [r[key] for r in part if isinstance(r.get(key), (int, float))]
        return f"{sum(vals) / len(vals):.4g}" if vals else "-"

    steps = [r for r in rows if not is_eval_only(r)]
    for key in keys:
        table.add_row(key, mean(steps[:window], key), mean(steps[-window:], key))
    if evals:
        table.add_section()
    for key, _ in evals:
        done = [r for r in rows if isinstance(r.get(key), (int, float))]
        table.add_row(key, mean(done[:1], key), mean(done[-1:], key))
    return table
