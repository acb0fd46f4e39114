"""Run logging: metrics.jsonl, TensorBoard (+ wandb when installed), samples, progress (a bar on a
terminal, plain lines elsewhere), plots.

Only rank 0 logs. ``metrics.jsonl`` has one JSON object per RL step; on resume the file is cut
back to the resumed step, then appended, so a resumed run reads like an uninterrupted one.
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
        kept = [r for r in read_metrics(self.path) if resume_step is not None and r.get("step", 0) <= resume_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)  # atomic: a crash here leaves either the old or the trimmed file
        self._file = self.path.open("a")
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=str(self.log_dir / "tensorboard"), purge_step=(resume_step or 0) + 1)
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
              curves: Sequence[tuple[str, str]] = CURVES) -> Path:
    """Overlay the metric curves of several runs ({label: metrics rows}) into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.4))
    for ax, (key, title) in zip(axes, curves):
        for label, rows in runs.items():
            steps, values = curve_points(rows, key)
            if steps:
                ax.plot(steps, values, label=label)
        ax.set_xlabel("RL step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def summary_table(rows: Sequence[Mapping[str, Any]], keys: Sequence[str] = ("reward_mean", "response_len_mean",
                  "clip_frac", "loss", "grad_norm", "kl", "entropy", "time_step_s"), window: int = 10) -> Any:
    """A rich Table: the mean of each metric over the first and the last ``window`` steps."""
    from rich.table import Table

    table = Table(title=f"run summary (mean of the first / last {window} steps)")
    for col in ("metric", "first", "last"):
        table.add_column(col, justify="right" if col != "metric" else "left")

    def mean(part: Sequence[Mapping[str, Any]], key: str) -> str:
        vals = [r[key] for r in part if isinstance(r.get(key), (int, float))]
        return f"{sum(vals) / len(vals):.4g}" if vals else "-"

    for key in keys:
        table.add_row(key, mean(rows[:window], key), mean(rows[-window:], key))
    return table
