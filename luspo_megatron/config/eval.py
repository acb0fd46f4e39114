"""The eval section: held-out evaluation during training (and by ``tools/eval.py``).

Flags follow slime (``--eval-interval``, ``--n-samples-per-eval-prompt``, ``--eval-max-response-len``,
``--eval-temperature``, ``--eval-top-p``); the data sets are ``--eval-data NAME=PATH``, repeatable,
each a JSONL or Parquet file in the training data's schema and keys (``--input-key``, ``--label-key``).
Unset sampling options take the rollout section's value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from luspo_megatron.config.fields import check, opt, positive, validate_fields

# A data set's NAME becomes part of metric keys (eval/NAME/avg@k) and file rows: keep it plain.
EVAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
EVAL_SUFFIXES = (".jsonl", ".json", ".parquet")


def parse_eval_data(entries: tuple[str, ...]) -> list[tuple[str, str]]:
    """``("aime24=/data/a.parquet", ...)`` -> ``[("aime24", "/data/a.parquet"), ...]``, checked."""
    pairs: list[tuple[str, str]] = []
    for entry in entries:
        name, sep, path = entry.partition("=")
        check(bool(sep) and EVAL_NAME.fullmatch(name) is not None and bool(path), EvalConfig, "eval_data",
              "NAME=PATH with NAME made of letters, digits, _ . - (e.g. aime24=/data/aime24.parquet)", entry)
        check(path.lower().endswith(EVAL_SUFFIXES), EvalConfig, "eval_data",
              f"a PATH ending in one of {EVAL_SUFFIXES}", entry)
        check(name not in [n for n, _ in pairs], EvalConfig, "eval_data", "each NAME once", entry)
        pairs.append((name, path))
    return pairs


# ---------------------------------------------------------------------------------------------- eval
@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation: at step 0, every ``eval_interval`` RL steps and at the end (rank 0)."""

    eval_data: tuple[str, ...] = opt(
        (), "--eval-data", action="extend", nargs="+",
        help="Held-out data set as NAME=PATH (JSONL or Parquet, the training data's schema and keys); repeat the "
             "flag (or list several) for more. Metrics: eval/NAME/avg@k, pass@1, 2, 4, ... ≤ k, response length.",
    )
    eval_interval: int | None = opt(
        None, "--eval-interval", help="Evaluate every N RL steps (and at step 0 and the end); None: step 0 and the end."
    )
    n_samples_per_eval_prompt: int = opt(
        1, "--n-samples-per-eval-prompt", help="Samples k per held-out prompt (avg@k, pass@k' for k' = 1, 2, 4 ≤ k)."
    )
    eval_max_response_len: int | None = opt(
        None, "--eval-max-response-len",
        help="max_new_tokens of an evaluation response; None: --rollout-max-response-len.",
    )
    eval_temperature: float | None = opt(
        None, "--eval-temperature", help="Evaluation sampling temperature; 0 = greedy; None: --rollout-temperature."
    )
    eval_top_p: float | None = opt(None, "--eval-top-p", help="Evaluation nucleus threshold; None: --rollout-top-p.")

    def __post_init__(self) -> None:
        validate_fields(self)
        parse_eval_data(self.eval_data)
        positive(EvalConfig, self, "n_samples_per_eval_prompt")
        for name in ("eval_interval", "eval_max_response_len"):
            if getattr(self, name) is not None:
                positive(EvalConfig, self, name)
        if self.eval_temperature is not None:
            check(self.eval_temperature >= 0, EvalConfig, "eval_temperature", "≥ 0 (0: greedy)", self.eval_temperature)
            check(self.eval_temperature > 0 or self.n_samples_per_eval_prompt == 1, EvalConfig,
                  "n_samples_per_eval_prompt", "1 with --eval-temperature 0 (greedy samples are all the same)",
                  self.n_samples_per_eval_prompt)
        if self.eval_top_p is not None:
            check(0 < self.eval_top_p <= 1, EvalConfig, "eval_top_p", "a float in (0, 1]", self.eval_top_p)

    @property
    def datasets(self) -> list[tuple[str, str]]:
        """The (NAME, PATH) pairs of ``--eval-data``, in the order given."""
        return parse_eval_data(self.eval_data)
