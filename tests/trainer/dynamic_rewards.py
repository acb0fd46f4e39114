"""Rewards for the dynamic-sampling runs (--custom-reward-path): one that is always 0 (every group flat),
and one that is flat on the prompts with an even answer and the digit fraction on the others."""

from tests.trainer.rewards import digit_fraction


def always_zero(response: str, label, metadata=None) -> float:
    return 0.0


def flat_on_even_answers(response: str, label, metadata=None) -> float:
    return 0.0 if int(str(label).strip()) % 2 == 0 else digit_fraction(response, label)
