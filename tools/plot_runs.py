"""Overlay the curves of several runs (e.g. GRPO vs GSPO vs LUSPO) into one PNG.

    python tools/plot_runs.py runs/grpo runs/gspo runs/luspo --out compare.png [--labels grpo gspo luspo]
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
    print(plot_runs(runs, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
