"""How a config field is declared: its default, its CLI flags, its help and its check, in one place.

    lr: float = opt(1e-6, "--lr", help="Peak learning rate.")
    ...
    def __post_init__(self):
        check(self.lr > 0, OptimizerConfig, "lr", "> 0", self.lr)   # ConfigError: "--lr: expected > 0, got -1.0"
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

from luspo_megatron.errors import ConfigError


def opt(default: Any, *flags: str, help: str, choices: tuple | None = None, **meta: Any) -> Any:
    """A config field with its CLI flags. ``meta`` may hold ``action`` (e.g. "store_false" for a
    ``--disable-...`` flag of a True default) and ``nargs``."""
    kwargs: dict[str, Any] = {"metadata": {"flags": flags, "help": help, "choices": choices, **meta}}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for sequence defaults: configs are immutable")
    kwargs["default"] = default
    return field(**kwargs)


def flag_of(cls: type, name: str) -> str:
    """The primary CLI flag of a field, for error messages."""
    for f in dataclasses.fields(cls):
        if f.name == name and f.metadata.get("flags"):
            return f.metadata["flags"][0]
    return name


def check(ok: bool, cls: type, name: str, rule: str, value: Any) -> None:
    """A one-line ConfigError naming the field's flag, the rule and the value, unless ``ok``."""
    if not ok:
        raise ConfigError(f"{flag_of(cls, name)}: expected {rule}, got {value!r}", field=name)


def positive(cls: type, obj: Any, *names: str) -> None:
    """Each named field of ``obj`` is an int ≥ 1."""
    for name in names:
        value = getattr(obj, name)
        check(isinstance(value, int) and value >= 1, cls, name, "a positive integer", value)
