"""metrics.jsonl (append, resume trimming, torn lines), TensorBoard scalars read back, plots, CLI,
progress lines off a terminal."""

import io
import json
import re
import subprocess
import sys
import types

import pytest

from luspo_megatron.logging import MetricsLogger, Progress, curve_points, plot_runs, read_metrics


def _rows(logger, steps):
    for step in steps:
        logger.log(step, {"reward_mean": step / 10, "loss": -step * 1.5, "response_len_mean": 20 + step})


def test_metrics_jsonl_resume_keeps_earlier_steps_and_drops_later_ones(tmp_path):
    log = MetricsLogger(tmp_path)
    _rows(log, range(1, 6))
    log.close()
    resumed = MetricsLogger(tmp_path, resume_step=3)  # the checkpoint was taken after step 3
    _rows(resumed, range(4, 8))
    resumed.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["loss"] for r in rows] == [-1.5 * s for s in range(1, 8)]


def test_torn_last_line_is_ignored_and_non_finite_values_are_json(tmp_path):
    log = MetricsLogger(tmp_path)
    log.log(1, {"loss": float("nan"), "grad_norm": float("inf")})
    log.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "lo')  # a crash mid-write
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows == [{"step": 1, "loss": None, "grad_norm": "inf"}]
    json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])  # strict JSON: no NaN literal


def test_tensorboard_scalars_read_back_equal_the_logged_values(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLogger(tmp_path)
    _rows(log, range(1, 4))
    log.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("loss")
    assert [e.step for e in events] == [1, 2, 3]
    assert [e.value for e in events] == [-1.5, -3.0, -4.5]


def test_curve_points_skip_missing_and_non_finite_values():
    rows = [{"step": 1, "x": 1.0}, {"step": 2}, {"step": 3, "x": float("nan")}, {"step": 4, "x": 4.0}]
    assert curve_points(rows, "x") == ([1, 4], [1.0, 4.0])


def test_plot_runs_cli_overlays_runs_and_rejects_empty_runs(tmp_path):
    for name in ("gspo", "luspo"):
        log = MetricsLogger(tmp_path / name)
        _rows(log, range(1, 5))
        log.close()
    out = tmp_path / "compare.png"
    proc = subprocess.run([sys.executable, "tools/plot_runs.py", str(tmp_path / "gspo"), str(tmp_path / "luspo"),
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = subprocess.run([sys.executable, "tools/plot_runs.py", str(tmp_path / "missing")],
                           capture_output=True, text=True)
    assert empty.returncode == 2 and "no metrics.jsonl rows" in empty.stderr
    assert plot_runs({"a": read_metrics(tmp_path / "gspo" / "metrics.jsonl")}, tmp_path / "one.png").exists()


# ------------------------------------------------------------------------------------ Progress
PROGRESS_LINE = re.compile(r"RL step (\d+)/(\d+)  reward (\S+)  len (\S+)  clip (\S+)  step (\S+)s  "
                           r"ETA (\d+):(\d\d):(\d\d)$")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _parse(text):
    lines = text.splitlines()
    matches = [PROGRESS_LINE.match(line) for line in lines]
    assert all(matches), lines
    return [m.groups() for m in matches]


def test_progress_off_a_terminal_logs_a_line_every_interval_with_the_given_values_and_the_eta():
    out = io.StringIO()  # not a terminal, like `make demo > log`
    step_times = [2000.0, 4000.0, 3000.0, 1000.0, 5000.0, 2500.0, 3500.0, 3000.0]
    progress = Progress(total=10, start=2, log_interval=3, stream=out)  # resumed after step 2
    given = {}
    for i, seconds in enumerate(step_times):
        step = 3 + i
        given[step] = {"reward_mean": 0.0625 * step, "response_len_mean": 100.5 + step, "clip_frac": 0.0125 * step,
                       "time_step_s": seconds, "loss": -1.0}
        progress.update(given[step])
    progress.close()
    rows = _parse(out.getvalue())
    assert [int(r[0]) for r in rows] == [3, 6, 9, 10]  # every 3rd step, and the last one
    for step, total, reward, length, clip, seconds, h, m, s in rows:
        step = int(step)
        metrics, seen = given[step], step_times[: step - 2]
        assert int(total) == 10
        # Equal at the printed precision (4, 1, 4 and 2 decimals).
        assert float(reward) == round(metrics["reward_mean"], 4) and float(length) == metrics["response_len_mean"]
        assert float(clip) == round(metrics["clip_frac"], 4) and float(seconds) == metrics["time_step_s"]
        eta = (10 - step) * (sum(seen) / len(seen))  # steps left × mean step time so far
        assert int(h) * 3600 + int(m) * 60 + int(s) == round(eta)
    assert rows[0][6:] == ("3", "53", "20")  # 7 steps × 2000 s = 14000 s, written by hand


def test_progress_without_step_times_uses_the_wall_clock_and_shows_missing_values_as_dashes(monkeypatch):
    import luspo_megatron.logging as logging_module

    clock = iter([100.0, 110.0, 130.0])  # construction, then two updates: steps of 10 s and 20 s
    monkeypatch.setattr(logging_module, "time", types.SimpleNamespace(monotonic=lambda: next(clock)))
    out = io.StringIO()
    progress = Progress(total=5, stream=out)
    progress.update({"reward_mean": 0.5})
    progress.update({})
    first, second = out.getvalue().splitlines()
    assert first == "RL step 1/5  reward 0.5000  len -  clip -  step 10.00s  ETA 0:00:40"  # 4 × 10 s
    assert second == "RL step 2/5  reward -  len -  clip -  step 20.00s  ETA 0:00:45"  # 3 × 15 s


def test_progress_on_a_terminal_draws_the_bar_and_no_lines_and_disabled_writes_nothing():
    tty = _Terminal()
    progress = Progress(total=3, stream=tty)
    for _ in range(3):
        progress.update({"reward_mean": 0.25, "response_len_mean": 7.0, "clip_frac": 0.5, "time_step_s": 1.0})
    progress.close()
    assert "RL step" in tty.getvalue() and "3/3" in tty.getvalue() and "clip" not in tty.getvalue()
    quiet = io.StringIO()
    progress = Progress(total=3, enabled=False, stream=quiet)
    progress.update({"reward_mean": 0.25, "time_step_s": 1.0})
    progress.close()
    assert quiet.getvalue() == ""
    with pytest.raises(ValueError, match="log_interval: expected ≥ 1, got 0"):
        Progress(total=3, log_interval=0, stream=quiet)
