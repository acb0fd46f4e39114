"""Held-out evaluation (``--eval-data NAME=PATH``): k samples per prompt through the run's rollout
engines, scored by the run's reward, reported as avg@k and the unbiased pass@k' (``algorithms/passk.py``).

    evaluator = Evaluator(config, engine, tokenizer, reward, stop_token_ids, samples_path=log_dir / EVAL_SAMPLES)
    if evaluator.due(step):
        metrics = evaluator(step)    # {"eval/aime24/avg@16": ..., "eval/aime24/pass@1": ..., ..., "time_eval_s": ...}

When (``due``): at step 0 (before training), every ``--eval-interval`` RL steps and at the last step,
on rank 0, after the step's weight sync (the engines hold the step's policy).

Seeds: data set NAME is generated in ONE ``generate`` call with the seed :func:`eval_seed` (run seed,
NAME), and the engines give sample j of prompt i the seed ``protocol.sample_seed(eval_seed, i, j)``.
Neither depends on the step, so the same weights give the same samples and the same numbers at every
evaluation (a run at lr 0 logs one set of numbers throughout; ``tools/eval.py`` on a checkpoint
repeats the run's evaluation of it).

Correct: the run's reward's ``math`` term > 0 (the whole reward when it has no such term, e.g. a
``--custom-reward-path``), as in the training metrics (``trainer/rollout_step.py``). Each sample is
one row of ``eval_samples.jsonl``: dataset, step, prompt_index, sample_index, prompt, response, label,
reward, correct, length, finish.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from luspo_megatron.algorithms.passk import eval_metrics
from luspo_megatron.config import RunConfig
from luspo_megatron.errors import DataError
from luspo_megatron.rollout.engine import FINISH_LENGTH, RolloutEngine, SamplingParams

logger = logging.getLogger("luspo_megatron.trainer")

EVAL_SAMPLES = "eval_samples.jsonl"  # under the run's log_dir


def eval_seed(seed: int, name: str) -> int:
    """The sampling seed of data set ``name``: a hash of (run seed, name), never of the step."""
    digest = hashlib.blake2b(f"eval:{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31 - 1)


def eval_sampling(config: RunConfig, name: str, stop_token_ids: tuple[int, ...]) -> SamplingParams:
    """The eval section's sampling, each unset option taken from the rollout section; no top-k."""
    ev, ro = config.eval, config.rollout
    pick = lambda value, default: default if value is None else value
    return SamplingParams(
        temperature=pick(ev.eval_temperature, ro.temperature), top_p=pick(ev.eval_top_p, ro.top_p), top_k=-1,
        max_new_tokens=pick(ev.eval_max_response_len, ro.max_response_len), stop_token_ids=stop_token_ids,
        seed=eval_seed(config.seed, name),
    )


@dataclass(frozen=True)
class EvalSet:
    name: str
    path: str
    records: list  # data.dataset.PromptRecord, in file order (prompt_index = position here)


def load_eval_sets(config: RunConfig, tokenizer: Any) -> list[EvalSet]:
    """Every ``--eval-data`` file, read with the training data's keys, chat template and length filter."""
    from luspo_megatron.data.dataset import PromptDataset, PromptFormat

    sets = []
    for name, path in config.eval.datasets:
        if not Path(path).is_file():
            raise DataError(f"--eval-data: {name}: no such file {path!r}", field="eval_data")
        dataset = PromptDataset.from_file(path, tokenizer, PromptFormat.from_config(config.data))
        logger.info("eval %s: %s", name, dataset.report())
        sets.append(EvalSet(name, path, list(dataset.records)))
    return sets


def _json_line(row: dict[str, Any]) -> str:
    return json.dumps(row, default=str) + "\n"  # labels from Parquet may be numpy scalars


def evaluate_set(engine: RolloutEngine, tokenizer: Any, reward: Any, eval_set: EvalSet, sampling: SamplingParams,
                 k: int, step: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """``k`` samples of every prompt of ``eval_set``: its metrics (keys ``eval/NAME/...``) and its sample rows."""
    records = eval_set.records
    groups = engine.generate([r.prompt_ids for r in records], sampling, n=k)  # [P][k], one call: fixed seeds
    assert len(groups) == len(records) and all(len(g) == k for g in groups), "engine dropped samples"
    samples = [s for group in groups for s in group]  # P·k, prompt-major
    labels = [r.label for r in records for _ in range(k)]
    texts = tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
    result = reward(texts, labels, [r.metadata for r in records for _ in range(k)])
    hits = [score > 0 for score in result.terms.get("math", result.rewards)]  # as trainer/rollout_step.py
    grid = lambda flat: [flat[p * k:(p + 1) * k] for p in range(len(records))]  # [P·k] -> [P][k]
    metrics = eval_metrics(grid(hits), grid([len(s.response_ids) for s in samples]),
                           grid([s.finish == FINISH_LENGTH for s in samples]))
    rows = [{"dataset": eval_set.name, "step": step, "prompt_index": i // k, "sample_index": i % k,
             "prompt": records[i // k].prompt, "response": texts[i], "label": labels[i],
             "reward": result.rewards[i], "correct": hits[i], "length": len(s.response_ids), "finish": s.finish}
            for i, s in enumerate(samples)]
    return {f"eval/{eval_set.name}/{key}": value for key, value in metrics.items()}, rows


def eval_due(step: int, interval: int | None, train_iters: int) -> bool:
    """Step 0 (before training), every ``interval`` RL steps, and the last step."""
    return step == 0 or step == train_iters or (interval is not None and step % interval == 0)


def trim_jsonl(path: Path, keep_up_to_step: int | None) -> None:
    """Keep the rows of ``path`` with step ≤ ``keep_up_to_step`` (a resumed run); none when it is None or 0."""
    if not path.exists():
        return
    kept = []
    if keep_up_to_step:
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn last line (a crash mid-write)
            if row.get("step", 0) <= keep_up_to_step:
                kept.append(line + "\n")
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


class Evaluator:
    """The held-out evaluation of a run (module docstring); rank 0 only."""

    def __init__(self, config: RunConfig, engine: RolloutEngine, tokenizer: Any, reward: Any,
                 stop_token_ids: tuple[int, ...], samples_path: Path | None = None,
                 resume_step: int | None = None) -> None:
        self.config, self.engine, self.tokenizer, self.reward = config, engine, tokenizer, reward
        self.stop_token_ids, self.samples_path = tuple(stop_token_ids), samples_path
        self.sets = load_eval_sets(config, tokenizer) if config.eval.eval_data else []
        if samples_path is not None:
            trim_jsonl(samples_path, resume_step)

    def due(self, step: int) -> bool:
        """Whether to evaluate after RL step ``step`` (0: before training); never without ``--eval-data``."""
        return bool(self.sets) and eval_due(step, self.config.eval.eval_interval, self.config.train_iters)

    def __call__(self, step: int) -> dict[str, float]:
        """Evaluate every data set with the engines' current weights; log and return the metrics."""
        start = time.perf_counter()
        metrics: dict[str, float] = {}
        k = self.config.eval.n_samples_per_eval_prompt
        for eval_set in self.sets:
            sampling = eval_sampling(self.config, eval_set.name, self.stop_token_ids)
            set_metrics, rows = evaluate_set(self.engine, self.tokenizer, self.reward, eval_set, sampling, k, step)
            metrics.update(set_metrics)
            if self.samples_path is not None:
                with self.samples_path.open("a") as f:
                    f.writelines(_json_line(row) for row in rows)
            top = 1 << (k.bit_length() - 1)  # the largest power of 2 ≤ k
            m = {key.rsplit("/", 1)[1]: value for key, value in set_metrics.items()}
            logger.info("eval step %d %s (%d prompts × %d): avg@%d %.4f  pass@%d %.4f  len %.1f  truncated %.3f",
                        step, eval_set.name, len(eval_set.records), k, k, m[f"avg@{k}"], top, m[f"pass@{top}"],
                        m["response_len_mean"], m["truncation_rate"])
        metrics["time_eval_s"] = time.perf_counter() - start
        return metrics
