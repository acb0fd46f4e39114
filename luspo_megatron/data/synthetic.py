"""A synthetic, verifiable task for the embedded default: chained arithmetic with a ``\\boxed{}`` answer.

Problem (difficulty k = number of operations, 1 … 8)::

    Start with 17. Add 5, then multiply by 3, then subtract 8. What is the result?
    Give the final answer as \\boxed{number}.

Reference solution (for an SFT warm-up), one line per operation, then the box::

    17 + 5 = 22
    22 * 3 = 66
    66 - 8 = 58
    \\boxed{58}

Design, and why response length should matter
----------------------------------------------
* **Sequential dependence.** Step i acts on the result of step i − 1, so the answer is a k-fold
  composition; mixing + / − with × means it does not collapse to one sum, and every operation
  changes the value (operand ranges below), so none can be skipped.
* **Every line is easy, the whole is hard in one go.** Each written line is one operation on
  numbers below 100, with the operands visible in the context (copied from the previous line and
  from the prompt). A model that answers directly must carry all k operations inside one forward
  pass; a fixed-depth transformer's accuracy at that drops with k, while writing one line per step
  keeps the per-token computation constant. Expected correctness therefore rises with the number
  of lines written, and the correct solution's length grows linearly in k (≈ 8 tokens per line
  with the Qwen3 tokenizer, which splits digits). That is the lever the length-dynamics
  experiment needs: under RL a policy that writes out its steps should win more reward on hard
  problems, so length should grow where the task demands it, and a length-biased objective should
  show up as length drifting away from k.
* **Graded difficulty.** ``steps`` is drawn from ``difficulty`` weights (default uniform on 1 … 8),
  recorded per row, so accuracy and length can be reported per level.
* **Closed values.** Intermediate values stay in [0, 99]: "add b" only when the sum is ≤ 99,
  "subtract b" only when the difference is ≥ 0, "multiply by c" (2 … 9) only when the product is
  ≤ 99. Operands are ≥ 1 (add/subtract) or ≥ 2 (multiply), so every step changes the value.
* **Deterministic.** ``make_dataset(n, seed)`` gives the same rows for the same arguments.

Rows follow the DAPO / verl schema (``prompt`` = chat messages, ``reward_model.ground_truth``),
plus ``solution`` (the step-by-step text), ``direct_solution`` (just the box, for a no-reasoning
SFT control) and ``extra_info.steps``, so the prompt-dataset loader reads them like any other file.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

MAX_VALUE = 99
OPERATION_WORDS = {"+": "add {}", "-": "subtract {}", "*": "multiply by {}"}
INSTRUCTION = "Give the final answer as \\boxed{number}."


@dataclass(frozen=True)
class ArithmeticProblem:
    start: int
    operations: tuple[tuple[str, int], ...]  # (op, operand), op in + - *

    @property
    def steps(self) -> int:
        return len(self.operations)

    def values(self) -> list[int]:
        """start, then the value after each operation."""
        values = [self.start]
        for op, x in self.operations:
            v = values[-1]
            values.append(v + x if op == "+" else v - x if op == "-" else v * x)
        return values

    @property
    def answer(self) -> int:
        return self.values()[-1]

    def question(self) -> str:
        words = [OPERATION_WORDS[op].format(x) for op, x in self.operations]
        chain = ", then ".join(words)
        return f"Start with {self.start}. {chain[0].upper()}{chain[1:]}. What is the result? {INSTRUCTION}"

    def solution(self) -> str:
        values = self.values()
        lines = [f"{values[i]} {op} {x} = {values[i + 1]}" for i, (op, x) in enumerate(self.operations)]
        return "\n".join(lines + [f"\\boxed{{{self.answer}}}"])

    def direct_solution(self) -> str:
        return f"\\boxed{{{self.answer}}}"

    def row(self) -> dict:
        """A DAPO / verl row (plus the SFT targets)."""
        return {
            "prompt": [{"role": "user", "content": self.question()}],
            "reward_model": {"style": "rule", "ground_truth": str(self.answer)},
            "data_source": "luspo/chained-arithmetic",
            "solution": self.solution(),
            "direct_solution": self.direct_solution(),
            "extra_info": {"steps": self.steps, "start": self.start,
                           "operations": [[op, x] for op, x in self.operations]},
        }


def _operation(rng: random.Random, value: int) -> tuple[str, int]:
    """A random operation that keeps the value in [0, 99] and changes it."""
    choices = []
    if value + 1 <= MAX_VALUE:
        choices.append(("+", rng.randint(1, min(20, MAX_VALUE - value))))
    if value - 1 >= 0:
        choices.append(("-", rng.randint(1, min(20, value))))
    if value >= 1 and value * 2 <= MAX_VALUE:
        choices.append(("*", rng.randint(2, min(9, MAX_VALUE // value))))
    return rng.choice(choices)  # never empty: value ≤ 98 allows +, value ≥ 1 allows −


def make_problem(rng: random.Random, steps: int) -> ArithmeticProblem:
    if steps < 1:
        raise ValueError(f"steps: expected ≥ 1, got {steps}")
    start = rng.randint(1, 30)
    value, operations = start, []
    for _ in range(steps):
        op, x = _operation(rng, value)
        operations.append((op, x))
        value = value + x if op == "+" else value - x if op == "-" else value * x
    return ArithmeticProblem(start, tuple(operations))


def make_dataset(n: int, seed: int, difficulty: Sequence[float] | None = None) -> list[dict]:
    """``n`` rows. ``difficulty[k-1]`` is the relative weight of k-step problems (default: uniform 1 … 8)."""
    weights = list(difficulty) if difficulty is not None else [1.0] * 8
    if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"difficulty: expected non-negative weights with a positive sum, got {weights}")
    rng = random.Random(seed)
    levels = list(range(1, len(weights) + 1))
    return [make_problem(rng, rng.choices(levels, weights)[0]).row() for _ in range(n)]


def write_jsonl(rows: Sequence[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)  # atomic: a reader never sees half a file
    return path
