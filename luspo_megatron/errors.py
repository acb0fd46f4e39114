"""One exception type per layer (docs/design.md §5).

Every subclass of :class:`UserError` is a mistake in what the user gave us (a flag, a file, a
server reply). The CLI prints such an error as one line and exits with status 2; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input. ``str(err)`` is a single line that names the field and what was expected."""

    def __init__(self, message: str, *, field: str | None = None, rule: str | None = None) -> None:
        message = " ".join(str(message).split())  # one line, whatever the caller wrote
        super().__init__(message)
        self.field = field
        self.rule = rule  # the message without the field's name, when the raiser kept them apart


class ConfigError(UserError):
    """A config value or flag is invalid (raised before any process group exists)."""


class DataError(UserError):
    """A dataset file or row cannot be used."""


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model."""


class RolloutError(UserError):
    """A rollout engine failed or answered with something we cannot use."""


class RewardError(UserError):
    """A reward function returned what cannot be a reward (NaN, ±Inf)."""
