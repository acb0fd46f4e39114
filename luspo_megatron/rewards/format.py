"""Format reward: an optional ``<think>…</think>`` block, then an answer that holds a ``\\boxed{}``.

Scores 1.0 for a well-formed response, 0.0 otherwise. With ``require_think`` (thinking mode) the
think block must be there. Cheap and deterministic, so it runs in the trainer's process.
"""

from __future__ import annotations

from typing import Any

from luspo_megatron.rewards.math import last_boxed

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
FORMAT_SCORE = "luspo_megatron.rewards.format:format_score"


def format_score(response: str, label: Any = None, metadata: Any = None, require_think: bool = False) -> float:
    text = response.strip()
    opens, closes = text.count(THINK_OPEN), text.count(THINK_CLOSE)
    if opens or closes:
        # One think block, first, closed; the answer follows it.
        if opens != 1 or closes != 1 or not text.startswith(THINK_OPEN):
            return 0.0
        text = text.split(THINK_CLOSE, 1)[1].strip()
    elif require_think:
        return 0.0
    return 1.0 if text and last_boxed(text) else 0.0


def format_score_thinking(response: str, label: Any = None, metadata: Any = None) -> float:
    return format_score(response, label, metadata, require_think=True)
