"""Math answer reward: the last ``\\boxed{}`` of a response, checked against the ground truth with
math-verify (``verify(gold, pred)``, gold first; offline_deps.md §3).

:func:`math_score` is what the reward pool runs (``luspo_megatron.rewards.math:math_score``). It
calls math-verify with its own signal timeouts switched off, because the pool's per-item alarm
bounds the whole item instead (``pool.py``); two alarms would overwrite each other's handler.
"""

from __future__ import annotations

import logging
from typing import Any

# Imported at module level: the pool loads this module before it starts an item's alarm, so the
# import (sympy, antlr: about a second) is not charged to the first item's timeout.
from math_verify import parse, verify

# math-verify logs every input it fails to parse, and warns that its own timeout is off.
for _name in ("math_verify", "latex2sympy2_extended"):
    logging.getLogger(_name).setLevel(logging.CRITICAL)

MATH_SCORE = "luspo_megatron.rewards.math:math_score"


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if absent."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None  # unbalanced: the response was cut inside the box


def _as_latex(answer: str) -> str:
    return answer if ("$" in answer or "\\boxed" in answer) else f"${answer}$"


def math_score(response: str, label: Any, metadata: Any = None) -> float:
    """1.0 when the last boxed answer of ``response`` equals ``label`` mathematically, else 0.0."""
    answer = last_boxed(response)
    if answer is None or not answer:
        return 0.0
    gold = parse(_as_latex(str(label)), parsing_timeout=None)
    pred = parse(f"${answer}$", parsing_timeout=None)
    if not gold or not pred:
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=None) else 0.0


def warm_up() -> None:
    """The first parse builds math-verify's LaTeX grammar (a fraction of a second); the pool calls
    this in each worker's initializer so that no item's timeout pays for it."""
    math_score("\\boxed{\\frac{1}{2}}", "0.5")
