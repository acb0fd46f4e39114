"""Evaluate a checkpoint on held-out data, on its own: the run's evaluation without the training.

    python tools/eval.py --config runs/x/config.yaml --load runs/x/ckpt --out runs/x/eval.json
    python tools/eval.py --config examples/paper_qwen3_30b_a3b_luspo.yaml --hf-checkpoint /models/Qwen3-30B-A3B \\
        --sglang-router http://router:30000 --eval-data aime24=/data/aime24.parquet --out base.json

It takes tools/train_luspo.py's flags and config files; pass the run's own ``config.yaml`` (the
trainer writes it into its log directory) so that the tokenizer, chat template, reward, sampling and
``--eval-data`` sets are the run's. What it evaluates:

- ``--load CKPT``: a training checkpoint directory (its ``latest``, or ``--ckpt-step N``) or a
  converted dist checkpoint. It is exported to a temporary Hugging Face directory with
  checkpoint/hf_export.py (the code behind tools/convert_megatron_to_hf.py) and the engines start
  from that. Why not load it through the Megatron policy: the export streams one tensor at a time
  on one CPU process, builds neither the model nor the optimizer, and needs no GPU or layout; the
  exported tensors are the checkpoint's own (fp32 here), so the engines generate exactly what the
  run's engines generated after syncing the same weights (tests/trainer/test_eval.py).
- ``--hf-checkpoint DIR`` alone: that model.

Engines: the run's kind. ``local`` / ``inprocess`` start on the weights above; ``sglang``
(``--sglang-url`` / ``--sglang-router``) attaches to running servers and points them at the weights
with ``/update_weights_from_disk`` (the directory must be visible to the servers: set ``TMPDIR`` to
a shared file system for ``--load``).

Output: a rich table, ``--out FILE`` the metrics as JSON (``{"source", "step", "metrics"}`` with the
run's keys: ``eval/NAME/avg@k``, ``eval/NAME/pass@1`` …), and every sample in ``FILE``'s
``.samples.jsonl`` sibling (the rows of the run's ``eval_samples.jsonl``). The numbers equal the
run's own evaluation of the same weights: the sampling seeds depend on (seed, data set, prompt,
sample) only. Bad input: one line, exit status 2.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any


def parse(argv: list[str] | None) -> tuple[Any, Any]:
    """(RunConfig, argparse namespace): train_luspo.py's parser plus ``--out``; YAML first, then flags."""
    from luspo_megatron.config import build_parser, config_from_dict, load_yaml, merge_overrides

    parser = build_parser(prog="eval.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="Write the metrics as JSON here, and every sample to <out>.samples.jsonl.")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "print_config", "out")}
    raw = load_yaml(args.config) if args.config else {}
    return config_from_dict(merge_overrides(raw, overrides), source=str(args.config or "flags")), args


def checkpoint_to_hf(load: str, ckpt_step: int | None, out: Path, hf_dir: Path) -> tuple[Path, int | None]:
    """Export the checkpoint ``--load`` names (a training save directory or a dist checkpoint) to the HF
    directory ``out``, with ``hf_dir``'s config and tokenizer files; returns (out, its step)."""
    from luspo_megatron.checkpoint import find_resume_point
    from luspo_megatron.checkpoint.convert import distributed_session
    from luspo_megatron.checkpoint.hf_export import convert_megatron_to_hf, prepare_megatron_export
    from luspo_megatron.errors import CheckpointError

    directory, step = Path(load), None
    if not (directory / "metadata.json").is_file():  # a training --save directory: its latest (or --ckpt-step)
        point = find_resume_point(directory, ckpt_step) if directory.is_dir() else None
        if point is None:
            raise CheckpointError(f"--load: {load!r} holds no complete checkpoint to evaluate", field="load")
        directory, step = point.path, point.step
    plan = prepare_megatron_export(directory, out, hf_config_from=hf_dir, overwrite=True)
    with distributed_session():
        convert_megatron_to_hf(plan)
    return out, step


def check_inputs(config: Any) -> None:
    """The cheap checks, before any heavy import: the export and the engines take minutes on a large model."""
    from luspo_megatron.config.paths import existing_dir, validate_paths
    from luspo_megatron.errors import ConfigError

    if not config.eval.eval_data:
        raise ConfigError("--eval-data: expected at least one NAME=PATH to evaluate on", field="eval_data")
    if not (config.checkpoint.load or config.model.hf_checkpoint):
        raise ConfigError("--load / --hf-checkpoint: expected the checkpoint or model directory to evaluate",
                          field="load")
    if config.checkpoint.load:  # the trainer may start without it (--load-if-exists); we evaluate it
        existing_dir("--load", config.checkpoint.load)
    validate_paths(config)  # the same checks as the trainer's: the HF directory, the eval files, the log dir


def evaluate(config: Any, out: Path | None) -> tuple[dict[str, float], str, int]:
    """Start the engines on the weights to evaluate and run the evaluation: (metrics, source, step)."""
    check_inputs(config)
    from luspo_megatron.rewards.compose import reward_from_config
    from luspo_megatron.rollout.fleet import start_fleet
    from luspo_megatron.trainer import assets as run_assets
    from luspo_megatron.trainer.evaluate import Evaluator

    # The run's tokenizer, stop tokens and initial model directory (reused from its log dir when there).
    assets = run_assets.prepare(config, Path(config.logging.log_dir) / "assets")
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="luspo_eval_")))
        hf_dir, step, source = assets.hf_dir, 0, str(assets.hf_dir)
        if config.checkpoint.load:
            hf_dir, ckpt_step = checkpoint_to_hf(config.checkpoint.load, config.checkpoint.ckpt_step, work / "hf",
                                                 assets.hf_dir)
            step = ckpt_step or 0
            source = config.checkpoint.load + (f" (step {ckpt_step})" if ckpt_step is not None else "")
        reward = stack.enter_context(reward_from_config(config.data))
        engine = stack.enter_context(start_fleet(config.rollout, hf_dir=hf_dir, seed=config.seed, log_dir=work))
        if config.rollout.engine == "sglang":  # running servers: point them at the weights to evaluate
            engine.update_weights_from_disk(hf_dir, f"eval-{step}")
        samples = out.with_suffix(".samples.jsonl") if out is not None else None
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
        evaluator = Evaluator(config, engine, assets.tokenizer(), reward, assets.stop_token_ids, samples_path=samples)
        metrics = evaluator(step)
    return metrics, source, step


def table(metrics: dict[str, float], title: str) -> Any:
    """One row per data set, one column per metric (avg@k, pass@1, 2, …, length, truncation)."""
    from rich.table import Table

    names = list(dict.fromkeys(key.split("/")[1] for key in metrics if key.startswith("eval/")))
    columns = list(dict.fromkeys(key.split("/", 2)[2] for key in metrics if key.startswith("eval/")))
    out = Table(title=title)
    out.add_column("data set")
    short = {"response_len_mean": "length", "truncation_rate": "truncated"}
    for column in columns:
        out.add_column(short.get(column, column), justify="right")
    for name in names:
        values = [metrics.get(f"eval/{name}/{column}") for column in columns]
        out.add_row(name, *("-" if v is None else f"{v:.4f}" if column != "response_len_mean" else f"{v:.1f}"
                            for v, column in zip(values, columns)))
    return out


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from rich.console import Console

    from luspo_megatron.config import config_to_yaml
    from luspo_megatron.errors import UserError

    prog = Path(sys.argv[0]).name
    try:
        config, args = parse(argv)
        if args.print_config:
            print(config_to_yaml(config), end="")
            return 0
        warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"full scope is deprecated", category=UserWarning)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        for noisy in ("megatron", "torch.distributed", "math_verify", "httpx"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        out = Path(args.out) if args.out else None
        metrics, source, step = evaluate(config, out)
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    Console().print(table(metrics, f"evaluation of {source}"))
    if out is not None:
        out.write_text(json.dumps({"source": source, "step": step, "metrics": metrics}, indent=1) + "\n")
        Console().print(f"metrics: {out}   samples: {out.with_suffix('.samples.jsonl')}")
    return 0


if __name__ == "__main__":  # the guard dist_checkpointing's spawned writer needs
    sys.exit(main())
