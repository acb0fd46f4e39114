"""The synthetic arithmetic task: verifiable, deterministic, graded, with correct reference solutions."""

from __future__ import annotations

import operator
import re
from collections import Counter

import pytest

from luspo_megatron.data.synthetic import make_dataset, write_jsonl
from luspo_megatron.rewards.math import math_score

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
LINE = re.compile(r"^(\d+) ([+*-]) (\d+) = (\d+)$")


def test_reference_solutions_are_correct_step_by_step_and_earn_full_reward():
    for row in make_dataset(60, seed=3):
        truth = row["reward_model"]["ground_truth"]
        lines = row["solution"].splitlines()
        steps = row["extra_info"]["steps"]
        assert len(lines) == steps + 1 and lines[-1] == f"\\boxed{{{truth}}}"
        # Recompute every line independently, and chain them: each starts from the previous result.
        value = row["extra_info"]["start"]
        for line, (op, x) in zip(lines[:-1], row["extra_info"]["operations"]):
            a, sym, b, result = LINE.match(line).groups()
            assert (int(a), sym, int(b)) == (value, op, x)
            assert OPS[sym](int(a), int(b)) == int(result) and 0 <= int(result) <= 99
            assert int(result) != value  # every operation changes the value
            value = int(result)
        assert str(value) == truth
        # The question states the same chain.
        question = row["prompt"][0]["content"]
        assert question.startswith(f"Start with {row['extra_info']['start']}.") and question.count("then") == steps - 1
        assert math_score(row["solution"], truth) == 1.0 and math_score(row["direct_solution"], truth) == 1.0
        assert math_score(row["solution"], str(int(truth) + 1)) == 0.0


def test_dataset_is_deterministic_from_the_seed():
    assert make_dataset(50, seed=1) == make_dataset(50, seed=1)
    assert make_dataset(50, seed=1) != make_dataset(50, seed=2)


def test_difficulty_weights_grade_the_number_of_steps():
    levels = Counter(r["extra_info"]["steps"] for r in make_dataset(800, seed=0))
    assert sorted(levels) == list(range(1, 9)) and min(levels.values()) > 60  # uniform over 1 … 8
    only_three = {r["extra_info"]["steps"] for r in make_dataset(100, seed=0, difficulty=[0, 0, 1])}
    assert only_three == {3}
    # Harder levels need longer reference solutions: the length lever of the task.
    by_level = {}
    for r in make_dataset(300, seed=5):
        by_level.setdefault(r["extra_info"]["steps"], []).append(len(r["solution"]))
    means = [sum(v) / len(v) for _, v in sorted(by_level.items())]
    assert means == sorted(means)
    with pytest.raises(ValueError, match="difficulty"):
        make_dataset(5, seed=0, difficulty=[0, 0])


def test_rows_are_written_as_jsonl_the_dataset_loader_reads(tmp_path):
    import json

    rows = make_dataset(5, seed=0)
    path = write_jsonl(rows, tmp_path / "arith.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
