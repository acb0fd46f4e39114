"""How a config field is declared: its default, its CLI flags, its help and its check, in one place.

    lr: float = opt(1e-6, "--lr", help="Peak learning rate.")
    ...
    def __post_init__(self):
        validate_fields(self)                                        # types, finiteness, bounds, choices
        check(self.lr > 0, OptimizerConfig, "lr", "> 0", self.lr)   # ConfigError: "--lr: expected > 0, got -1.0"

The generic rules (:func:`validate_fields`, first in every section's ``__post_init__``) follow from
a field's annotation and metadata, so a value from YAML, from a flag or from Python is held to the
same rule: a ``float`` is finite (``allow_nonfinite=True`` in ``opt`` lifts that), an ``int`` is an
integer (never a bool) in ``[low, high]`` (default: what a signed 64-bit integer holds), a ``bool``
is a bool, a ``str`` has no NUL character, and a field with ``choices`` takes one of them (argparse
checks choices on the command line only; YAML values come through here). The rules of one field
(``> 0``, a fraction, "exactly one of two flags") stay in its section's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import field
from typing import Any

from luspo_megatron.errors import ConfigError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# The longest timeout a field may ask for: a year. Past about 9.2e9 s (threading.TIMEOUT_MAX) the
# waits underneath raise OverflowError; nobody means a timeout of centuries.
MAX_SECONDS = 365 * 24 * 3600.0


def opt(default: Any, *flags: str, help: str, choices: tuple | None = None, **meta: Any) -> Any:
    """A config field with its CLI flags. ``meta`` may hold ``action`` (e.g. "store_false" for a
    ``--disable-...`` flag of a True default), ``nargs``, ``low`` / ``high`` (inclusive bounds of a
    number; ints default to the int64 range) and ``allow_nonfinite`` (a float that may be NaN/±Inf)."""
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
        text = f"expected {rule}, got {shown(value)}"
        raise ConfigError(f"{flag_of(cls, name)}: {text}", field=name, rule=text)


def positive(cls: type, obj: Any, *names: str) -> None:
    """Each named field of ``obj`` is an int ≥ 1."""
    for name in names:
        value = getattr(obj, name)
        check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, cls, name,
              "a positive integer", value)


def seconds(cls: type, obj: Any, *names: str) -> None:
    """Each named field of ``obj`` is a duration in (0, MAX_SECONDS]."""
    for name in names:
        value = getattr(obj, name)
        check(0 < value <= MAX_SECONDS, cls, name, f"a number of seconds in (0, {MAX_SECONDS:.0f}] (a year)", value)


# ----------------------------------------------------------------------------------- generic rules
def base_type(annotation: Any) -> tuple[Any, bool]:
    """(the concrete type, whether None is allowed) of a field annotation such as ``int | None``."""
    hint = annotation
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    return hint, optional


@functools.cache
def field_types(cls: type) -> dict[str, tuple[Any, bool]]:
    """``{name: (concrete type, optional)}`` of a dataclass's fields (annotations resolved once)."""
    return {name: base_type(hint) for name, hint in typing.get_type_hints(cls).items()}


def shown(value: Any) -> str:
    """``repr(value)``, cut to one readable piece (a 5000-digit integer is not a message)."""
    try:
        text = repr(value)
    except ValueError:  # an int past sys.get_int_max_str_digits()
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    return text if len(text) <= 80 else text[:77] + "..."


def _bound(n: int | float) -> str:
    """A bound as people write it: 2**32 - 1 rather than 4294967295."""
    if isinstance(n, int) and abs(n) >= 2**16:
        for k in range(16, 65):
            if n == 2**k - 1:
                return f"2**{k} - 1"
            if n == -(2**k):
                return f"-2**{k}"
    return f"{n:g}" if isinstance(n, float) else str(n)


def validate_fields(obj: Any) -> None:
    """The rules every field of the dataclass ``obj`` obeys by its annotation and metadata (module
    docstring); raises a one-line ConfigError naming the flag. Call it first in ``__post_init__``."""
    cls = type(obj)
    types_ = field_types(cls)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        hint, optional = types_[f.name]
        meta = f.metadata
        if value is None:
            check(optional, cls, f.name, "a value", value)
            continue
        if dataclasses.is_dataclass(hint):
            check(isinstance(value, hint), cls, f.name, f"a {hint.__name__}", value)
            continue
        if hint is bool:
            check(isinstance(value, bool), cls, f.name, "true or false", value)
        elif hint is int:
            check(isinstance(value, int) and not isinstance(value, bool), cls, f.name, "an integer", value)
            low, high = meta.get("low", INT64_MIN), meta.get("high", INT64_MAX)
            check(low <= value <= high, cls, f.name, f"an integer in [{_bound(low)}, {_bound(high)}]", value)
        elif hint is float:
            check(isinstance(value, (int, float)) and not isinstance(value, bool), cls, f.name, "a number", value)
            if not meta.get("allow_nonfinite"):
                check(math.isfinite(value), cls, f.name, "a finite number", value)
            if "low" in meta or "high" in meta:
                low, high = meta.get("low", -math.inf), meta.get("high", math.inf)
                check(low <= value <= high, cls, f.name, f"a number in [{_bound(low)}, {_bound(high)}]", value)
        elif hint is str:
            check(isinstance(value, str), cls, f.name, "a string", value)
            check("\0" not in value, cls, f.name, "a string without NUL characters", value)
        elif typing.get_origin(hint) is tuple:
            check(isinstance(value, tuple) and all(isinstance(v, str) and "\0" not in v for v in value), cls,
                  f.name, "a list of strings", value)
        choices = meta.get("choices")
        if choices:
            check(value in choices, cls, f.name, f"one of {', '.join(map(str, choices))}", value)
