"""YAML + flags → a validated :class:`~luspo_megatron.config.run.RunConfig`, and back to YAML.

The argparse parser and the YAML loader are generated from the fields (``config/fields.py``): the
YAML of ``--config`` is read first, then every flag given on the command line overrides it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

import yaml

from luspo_megatron.config.fields import base_type, flag_of, shown
from luspo_megatron.config.run import SECTIONS, RunConfig
from luspo_megatron.errors import ConfigError


# ------------------------------------------------------------------------------ loading and parsing
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(cls: type, name: str, value: Any, where: str) -> Any:
    """Convert a YAML or CLI value to the field's type, or raise a one-line ConfigError."""
    hint, optional = base_type(_field_types(cls)[name])
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: expected a value, got null", field=name)
    origin = typing.get_origin(hint)
    try:
        if origin is tuple:
            items = value if isinstance(value, (list, tuple)) else [value]
            if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in items):
                raise ValueError  # a mapping, a list or a boolean is not an entry of a list of strings
            return tuple(str(v) for v in items)
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            if isinstance(value, (dict, list, bool)):  # YAML's yes/no/true/false are booleans: quote text
                raise ValueError
            return str(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: float(10**400)
        pass
    else:
        return value
    type_name = "a list of strings" if origin is tuple else getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{where}: expected {type_name}, got {shown(value)}", field=name)


def _section_values(cls: type, raw: Any, path: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of {cls.__name__} keys, got {shown(raw)}", field=path)
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in raw.items():
        if key not in names:
            raise ConfigError(f"{path}.{key}: unknown key; expected one of {sorted(names)}", field=str(key))
        out[key] = _coerce(cls, key, value, f"{flag_of(cls, key)} ({path}.{key})")
    return out


def config_from_dict(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """Build and validate a RunConfig from a nested dict (the YAML layout)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    top_names = {f.name for f in dataclasses.fields(RunConfig)} - set(SECTIONS)
    top: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    for key, value in raw.items():
        if key in SECTIONS:
            sections[key] = SECTIONS[key](**_section_values(SECTIONS[key], value, key))
        elif key in top_names:
            top[key] = _coerce(RunConfig, key, value, f"{flag_of(RunConfig, key)} ({key})")
        else:
            raise ConfigError(
                f"{source}: unknown key {key!r}; expected one of {sorted(top_names | set(SECTIONS))}", field=str(key)
            )
    return RunConfig(**top, **sections)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping of a YAML config file, or a one-line ConfigError naming ``--config``."""
    path = Path(path)
    try:
        if not path.is_file():
            raise ConfigError(f"--config: no such file {str(path)!r}", field="config")
        data = path.read_bytes()
    except (OSError, ValueError) as err:  # ValueError: a NUL in the path
        raise ConfigError(f"--config: cannot read {str(path)!r} ({err})", field="config") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"--config: {path} is not UTF-8 text (byte {data[err.start]:#04x} at offset {err.start})",
                          field="config") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(f"--config: {path} is not valid YAML{line}", field="config") from None
    except RecursionError:
        raise ConfigError(f"--config: {path} is nested too deeply", field="config") from None
    except ValueError as err:  # PyYAML builds ints with int(): more than 4300 digits is refused
        raise ConfigError(f"--config: {path} holds a value that cannot be read ({err})", field="config") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config: {path} must hold a mapping, got {type(raw).__name__}", field="config")
    return raw


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (and exits 2), like every other user error."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_field(group: argparse._ArgumentGroup, cls: type, f: dataclasses.Field, dest: str) -> None:
    meta = f.metadata
    kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": meta["help"]}
    action = meta.get("action")
    if action in ("store_true", "store_false"):
        kwargs["action"] = action
    else:
        if action == "extend":  # a repeatable list flag (--eval-data a=x --eval-data b=y)
            kwargs["action"] = action
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if meta.get("nargs"):
            kwargs["nargs"] = meta["nargs"]
        kwargs["metavar"] = f.name.upper() if not meta.get("choices") else None
        kwargs["help"] += f" (default: {f.default})" if f.default is not dataclasses.MISSING else ""
    group.add_argument(*meta["flags"], **kwargs)


def build_parser(prog: str = "train_luspo.py", description: str | None = None) -> OneLineArgumentParser:
    """The CLI: ``--config`` plus one flag per config field, grouped by section."""
    parser = OneLineArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML config; flags given on the command line override it.")
    parser.add_argument("--print-config", action="store_true", help="Print the resolved config as YAML and exit.")
    run_group = parser.add_argument_group("run")
    for f in dataclasses.fields(RunConfig):
        if f.name not in SECTIONS:
            _add_field(run_group, RunConfig, f, f.name)
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(cls):
            _add_field(group, cls, f, f"{section}.{f.name}")
    return parser


def merge_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply ``{"section.field": value}`` CLI overrides onto the nested YAML dict."""
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for dest, value in overrides.items():
        if "." in dest:
            section, name = dest.split(".", 1)
            merged.setdefault(section, {})
            if not isinstance(merged[section], dict):
                raise ConfigError(f"config: {section} must be a mapping")
            merged[section][name] = value
        else:
            merged[dest] = value
    return merged


def load_config(
    argv: list[str] | None = None, default_config: str | Path | None = None
) -> tuple[RunConfig, argparse.Namespace]:
    """Parse ``argv``: the YAML of ``--config`` (or ``default_config``), then the flags over it."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "print_config")}
    config_path = args.config or default_config
    raw = load_yaml(config_path) if config_path else {}
    return config_from_dict(merge_overrides(raw, overrides), source=str(config_path or "flags")), args


def config_to_yaml(config: RunConfig) -> str:
    """The resolved config as YAML (what ``--print-config`` prints and ``config.yaml`` keeps), secrets redacted."""
    return yaml.safe_dump(json_ready(redacted(config.to_dict())), sort_keys=False, default_flow_style=False)


def redacted(value: Any) -> Any:
    """``config.to_dict()`` with every ``*api_key`` value replaced: logs and config files never hold a key."""
    if isinstance(value, dict):
        return {k: ("<redacted>" if k.endswith("api_key") and v is not None else redacted(v)) for k, v in value.items()}
    return value


def json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [json_ready(v) for v in value]
    return value
