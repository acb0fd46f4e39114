"""The files and directories a config names, checked before any process group starts.

``validate_paths(config)`` is what ``tools/train_luspo.py`` calls between parsing and the Trainer
(every rank calls it, so all of them stop together). Each problem is a one-line ConfigError
naming the flag. Nothing is created or changed: a directory that does not exist yet is judged by
its nearest existing parent, and "writable" means that a nameless temporary file could be created
there and was removed at once (an honest test: ``os.access`` says yes to root on a read-only
file system and to /proc).

What is checked:

- ``--log-dir``, ``--save``: a directory, or a path whose nearest existing parent is a writable directory;
- ``--prompt-data``, each ``--eval-data`` path: a readable regular file;
- ``--tokenizer-path``: a directory with ``tokenizer.json`` or ``tokenizer_config.json``;
- ``--hf-checkpoint``: a directory whose ``config.json`` is a UTF-8 JSON object;
- ``--load`` (when it exists; a missing one is the checkpoint layer's call, see ``--load-if-exists``)
  and ``--pretrained-checkpoint``: directories;
- ``--custom-reward-path module:function``: the module can be found on ``sys.path`` (located, not
  run: the reward pool imports it on rank 0 only).
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from luspo_megatron.errors import ConfigError

PROMPT_SUFFIXES = (".jsonl", ".json", ".parquet")  # what data/dataset.py::read_rows reads


def _fail(flag: str, message: str) -> ConfigError:
    return ConfigError(f"{flag}: {message}", field=flag.lstrip("-").replace("-", "_"))


def _path(flag: str, value: str) -> Path:
    if not value or not value.strip():
        raise _fail(flag, "expected a path, got ''")
    return Path(value).expanduser()


def writable_dir(flag: str, value: str) -> None:
    """``value`` is a writable directory, or can be created: its nearest existing parent is one."""
    try:
        _writable_dir(flag, value)
    except OSError as err:  # a parent that cannot be searched, a loop of links, ...
        raise _fail(flag, f"{value!r} cannot be used ({err.strerror or err})") from None


def _writable_dir(flag: str, value: str) -> None:
    path = _path(flag, value)
    probe = path.absolute()
    while not probe.exists() and not probe.is_symlink():
        probe = probe.parent
    if probe.is_symlink() and not probe.exists():
        raise _fail(flag, f"{value!r}: {str(probe)!r} is a dangling symbolic link")
    if not probe.is_dir():
        what = "is a file, not a directory" if probe == path.absolute() else "cannot be created"
        detail = "" if probe == path.absolute() else f" ({str(probe)!r} is not a directory)"
        raise _fail(flag, f"{value!r} {what}{detail}")
    try:
        with tempfile.TemporaryFile(dir=probe):  # O_TMPFILE where it exists: never has a name
            pass
    except OSError as err:
        where = "" if probe == path.absolute() else f" (its nearest existing parent {str(probe)!r})"
        raise _fail(flag, f"{value!r}{where} is not writable ({err.strerror or err})") from None


def readable_file(flag: str, value: str, what: str = "file") -> Path:
    """``value`` is a regular file that opens for reading."""
    path = _path(flag, value)
    try:
        if path.is_dir():
            raise _fail(flag, f"{value!r} is a directory, expected a {what}")
        if not path.is_file():
            raise _fail(flag, f"{value!r} is not a regular file" if path.exists() else f"no such {what} {value!r}")
        with path.open("rb") as f:
            f.read(1)
    except OSError as err:
        raise _fail(flag, f"{value!r} is not readable ({err.strerror or err})") from None
    return path


def existing_dir(flag: str, value: str) -> Path:
    path = _path(flag, value)
    if not path.is_dir():
        raise _fail(flag, f"{value!r} is not a directory" if path.exists() else f"no such directory {value!r}")
    return path


def hf_checkpoint(value: str) -> None:
    """A Hugging Face model directory: its ``config.json`` is a UTF-8 JSON object."""
    path = existing_dir("--hf-checkpoint", value)
    config = readable_file("--hf-checkpoint", str(path / "config.json"), "config.json")
    try:
        data = json.loads(config.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise _fail("--hf-checkpoint", f"{str(config)!r} is not UTF-8 text") from None
    except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise _fail("--hf-checkpoint", f"{str(config)!r} is not valid JSON ({str(err)[:80]})") from None
    if not isinstance(data, dict):
        raise _fail("--hf-checkpoint", f"{str(config)!r} holds a {type(data).__name__}, expected a JSON object")


def tokenizer_dir(value: str) -> None:
    path = existing_dir("--tokenizer-path", value)
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        raise _fail("--tokenizer-path", f"{value!r} has neither tokenizer.json nor tokenizer_config.json")


def reward_module(value: str) -> None:
    """The module of ``module:function`` can be found (its parent packages are imported, it is not)."""
    module = value.partition(":")[0]
    try:
        spec = importlib.util.find_spec(module)
    except Exception as err:  # a parent package that fails to import raises whatever it raises
        raise _fail("--custom-reward-path", f"cannot find module {module!r} ({type(err).__name__}: {err})"[:300]) \
            from None
    if spec is None:
        raise _fail("--custom-reward-path", f"cannot find module {module!r} on the Python path")


def validate_paths(config: Any) -> None:
    """Check every path ``config`` (a RunConfig) names; see the module docstring."""
    writable_dir("--log-dir", config.logging.log_dir)
    ckpt = config.checkpoint
    if ckpt.save is not None:
        writable_dir("--save", ckpt.save)
    if ckpt.load is not None and os.path.lexists(_path("--load", ckpt.load)):
        existing_dir("--load", ckpt.load)
    if ckpt.pretrained_checkpoint is not None:
        existing_dir("--pretrained-checkpoint", ckpt.pretrained_checkpoint)
    data = config.data
    if data.prompt_data is not None:
        path = readable_file("--prompt-data", data.prompt_data)
        if path.suffix.lower() not in PROMPT_SUFFIXES:
            raise _fail("--prompt-data", f"expected a {', '.join(PROMPT_SUFFIXES)} file, got {data.prompt_data!r}")
    for name, path in config.eval.datasets:
        try:
            readable_file("--eval-data", path)
        except ConfigError as err:
            raise _fail("--eval-data", f"{name}: {str(err).removeprefix('--eval-data: ')}") from None
    if data.tokenizer_path is not None:
        tokenizer_dir(data.tokenizer_path)
    if config.model.hf_checkpoint is not None:
        hf_checkpoint(config.model.hf_checkpoint)
    if data.custom_reward_path is not None:
        reward_module(data.custom_reward_path)
