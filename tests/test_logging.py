"""metrics.jsonl (append, resume trimming, torn lines), TensorBoard scalars read back, plots, CLI."""

import json
import subprocess
import sys

from luspo_megatron.logging import MetricsLogger, curve_points, plot_runs, read_metrics


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
