"""Math answer rewards: the response's final answer checked against the ground truth with
math-verify (``verify(gold, pred)``, gold first; offline_deps.md §3).

Where the final answer is read (``mode`` of :func:`score_answer`, ``--reward`` in brackets):

* ``boxed`` (``math``): the last ``\\boxed{}`` of the response;
* ``dapo`` (``dapo``): the last ``Answer: ...`` line, the form DAPO-Math-17k's prompts ask for
  ("The last line of your response should be of the form Answer: $Answer"). It is read and
  normalised the way verl's ``math_dapo`` (and slime's ``math_dapo_utils``) read it: the last 300
  characters of the response, the last case-insensitive ``Answer:`` match, the Minerva
  normalisation (Lewkowycz et al. 2022, appendix D) of both sides. verl then compares the two
  strings; we score 1 when they are equal *or* math-verify finds them equivalent (``0.5`` vs
  ``\\frac{1}{2}``), so every answer verl accepts is accepted here. Scores are 1/0 (verl: 1/-1);
* ``auto`` (``auto``): the boxed answer when the response has one, else the ``Answer:`` line.

:func:`score_answer` is the public entry point and runs in the calling process without a time
limit. The reward pool runs :func:`math_score`, :func:`dapo_score` and :func:`auto_score` (named
by :data:`MATH_SCORE` etc.), with math-verify's own signal timeouts switched off, because the
pool's per-item alarm bounds the whole item instead (``pool.py``); two alarms would overwrite each
other's handler.
"""

from __future__ import annotations

import logging
import re
from typing import Any

# Imported at module level: the pool loads this module before it starts an item's alarm, so the
# import (sympy, antlr: about a second) is not charged to the first item's timeout.
from math_verify import parse, verify

# math-verify logs every input it fails to parse, and warns that its own timeout is off.
for _name in ("math_verify", "latex2sympy2_extended"):
    logging.getLogger(_name).setLevel(logging.CRITICAL)

MATH_SCORE = "luspo_megatron.rewards.math:math_score"  # boxed
DAPO_SCORE = "luspo_megatron.rewards.math:dapo_score"
AUTO_SCORE = "luspo_megatron.rewards.math:auto_score"
SCORE_MODES = ("boxed", "dapo", "auto")

# verl's math_dapo reads the answer line in the response's last 300 characters only ("the longest
# answer in MATH-500 has 159 characters"); an Answer line followed by more text than that scores 0.
DAPO_TAIL_CHARS = 300
_ANSWER_LINE = re.compile(r"answer\s*:\s*([^\n]+)", re.IGNORECASE)  # "Answer: <rest of the line>"

# Minerva normalisation tables (Lewkowycz et al. 2022, appendix D, as verl's math_dapo applies them;
# slime also drops chat end-of-turn tokens). Replacements run in order, then the removals.
_REPLACE = (("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
            (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"))
_REMOVE = ("square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots", "sue",
           "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals",
           "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
           "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;",
           ",\\!", "{,}", '"', "\\dots", "<|im_end|>", "<|endoftext|>")
_FIRST_MATH_SPAN = re.compile(r".*?\$(.*?)\$.*")  # "is $x$ or $y$" -> "$x$" (a line at a time)
# \text{cm} -> cm, then \textbf, then \overline (each to its first }; in this order, as verl does).
_UNWRAP_FIRST = tuple(re.compile(rf"\\{command}\{{(.*?)\}}") for command in ("text", "textbf", "overline"))
_UNWRAP_BOXED = re.compile(r"\\boxed\{(.*)\}")  # \boxed{\frac{1}{2}} -> \frac{1}{2} (to the last })
_SHORT_FRAC = re.compile(r"frac([^{])(.)")  # \frac12 -> \frac{1}{2}
_SHORT_SQRT = re.compile(r"sqrt([^{])")  # \sqrt2 -> \sqrt{2}


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


def last_answer_line(text: str) -> str | None:
    """What follows the last ``Answer:`` (any case) in the last :data:`DAPO_TAIL_CHARS` characters,
    to the end of its line; None if there is none."""
    found = _ANSWER_LINE.findall(text[-DAPO_TAIL_CHARS:])
    return found[-1] if found else None


def normalize_dapo_answer(answer: str) -> str:
    """verl math_dapo's normalisation: ``"x = \\$1,000 dollars"`` -> ``"1000"``,
    ``"$\\frac12$"`` -> ``"\\frac{1}{2}"``, ``"\\text{(B)}"`` -> ``"(B)"``."""
    answer = str(answer).split("=")[-1]  # "x = 3" -> " 3"
    for old, new in _REPLACE:
        answer = answer.replace(old, new)
    for unit in _REMOVE:
        answer = answer.replace(unit, "")
    answer = _FIRST_MATH_SPAN.sub(r"$\1$", answer)
    for command in _UNWRAP_FIRST:
        answer = command.sub(r"\1", answer)
    answer = _UNWRAP_BOXED.sub(r"\1", answer)
    answer = _SHORT_FRAC.sub(r"frac{\1}{\2}", answer)
    answer = _SHORT_SQRT.sub(r"sqrt{\1}", answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():  # "1,000" -> "1000"
        answer = answer.replace(",", "")
    return answer.strip()


def _as_latex(answer: str) -> str:
    return answer if ("$" in answer or "\\boxed" in answer) else f"${answer}$"


def _equivalent(gold_latex: str, pred_latex: str) -> bool:
    """math-verify, gold first, with its own timeouts off (see the module docstring)."""
    gold = parse(gold_latex, parsing_timeout=None)
    pred = parse(pred_latex, parsing_timeout=None)
    return bool(gold and pred and verify(gold, pred, timeout_seconds=None))


def _score_boxed(answer: str, ground_truth: str) -> float:
    return 1.0 if _equivalent(_as_latex(ground_truth), f"${answer}$") else 0.0


def _score_dapo(line: str, ground_truth: str) -> float:
    pred, gold = normalize_dapo_answer(line), normalize_dapo_answer(ground_truth)
    if not pred:
        return 0.0
    if pred == gold:  # verl's whole criterion
        return 1.0
    return 1.0 if _equivalent(f"${gold}$", f"${pred}$") else 0.0


def score_answer(response: str, ground_truth: str, mode: str = "auto") -> float:
    """1.0 when the final answer of ``response`` (read as ``mode`` says: ``"boxed"``, ``"dapo"`` or
    ``"auto"``, see the module docstring) equals ``ground_truth`` mathematically, else 0.0."""
    if mode not in SCORE_MODES:
        raise ValueError(f"mode: expected one of {SCORE_MODES}, got {mode!r}")
    ground_truth = str(ground_truth)  # labels read from Parquet may be ints
    if mode != "dapo":
        boxed = last_boxed(response)
        if boxed:  # an empty or unclosed box counts as no box
            return _score_boxed(boxed, ground_truth)
        if mode == "boxed":
            return 0.0
    line = last_answer_line(response)
    return 0.0 if line is None else _score_dapo(line, ground_truth)


def math_score(response: str, label: Any, metadata: Any = None) -> float:
    """The pool's ``--reward math``: the last boxed answer."""
    return score_answer(response, label, "boxed")


def dapo_score(response: str, label: Any, metadata: Any = None) -> float:
    """The pool's ``--reward dapo``: the last ``Answer:`` line."""
    return score_answer(response, label, "dapo")


def auto_score(response: str, label: Any, metadata: Any = None) -> float:
    """The pool's ``--reward auto``: the boxed answer if any, else the ``Answer:`` line."""
    return score_answer(response, label, "auto")


def warm_up() -> None:
    """The first parse builds math-verify's LaTeX grammar (a fraction of a second); the pool calls
    this in each worker's initializer so that no item's timeout pays for it."""
    score_answer("\\boxed{\\frac{1}{2}}", "0.5", "boxed")
