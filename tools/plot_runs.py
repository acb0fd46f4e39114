"""Overlay the curves of several runs (e.g. GRPO vs GSPO vs LUSPO) into one PNG.

    python tools/plot_runs.py runs/grpo runs/gspo runs/luspo --out compare.png [--labels grpo gspo luspo]
    python tools/plot_runs.py runs/grpo runs/gspo runs/luspo --curves eval/aime24/avg@4 response_len_mean

By default: reward, response length and clip fraction, then every held-out evaluation curve the runs
logged (``eval/NAME/avg@k`` and ``eval/NAME/response_len_mean``, one point per evaluation).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from luspo_megatron.logging import plot_runs, read_metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("runs", nargs="+", help="run log directories (each with a metrics.jsonl)")
    parser.add_argument("--labels", nargs="+", help="legend labels (default: the directory names)")
    parser.add_argument("--out", default="compare.png", help="output PNG")
    parser.add_argument("--curves", nargs="+", metavar="KEY",
                        help="metrics.jsonl keys to draw instead of the default curves (e.g. eval/aime24/avg@16)")
    args = parser.parse_args(argv)
    labels = args.labels or [Path(r).name for r in args.runs]
    if len(labels) != len(args.runs):
        print(f"plot_runs.py: error: --labels: expected {len(args.runs)} labels, got {len(labels)}", file=sys.stderr)
        return 2
    runs = {}
    for label, run in zip(labels, args.runs):
        rows = read_metrics(Path(run) / "metrics.jsonl")
        if not rows:
            print(f"plot_runs.py: error: {run}: no metrics.jsonl rows", file=sys.stderr)
            return 2
        runs[label] = rows
    if args.curves:
        missing = [k for k in args.curves if not any(k in row for rows in runs.values() for row in rows)]
        if missing:
            print(f"plot_runs.py: error: --curves: no run logged {', '.join(missing)}", file=sys.stderr)
            return 2
    print(plot_runs(runs, args.out, curves=[(k, k) for k in args.curves] if args.curves else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
