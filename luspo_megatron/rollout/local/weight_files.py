"""Weight directories for our server: where an update may read, and whether it is complete.

``/update_weights_from_disk`` (and :meth:`TransformersGenerator.reload`) is all or nothing. Before
one weight is copied, the directory must

1. resolve (symlinks and ``..`` followed) inside one of ``--allowed-weight-dirs`` when that list is
   given, and so must every file read from it (a symlink cannot lead outside);
2. hold a ``config.json`` whose ``model_type``, ``architectures`` and ``vocab_size`` equal the
   served model's;
3. hold safetensors files whose tensors are exactly the served model's: the same names (those of
   the directory the server started from), the same shapes, floating-point dtypes, each name once,
   and, when ``model.safetensors.index.json`` is present, the files and names it lists;
4. read back in full (a truncated or corrupt file fails here, still before anything is copied).

Anything else raises :class:`WeightUpdateRefused` naming the first problem, and the served weights
and weight version stay as they were. SGLang's own loader reads what it finds and leaves missing
parameters as they were; transformers' ``from_pretrained`` (our old fallback) initialised them at
random. Neither is what a trainer pushing a policy wants.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from luspo_megatron.errors import RolloutError

INDEX_FILE = "model.safetensors.index.json"
CONFIG_KEYS = ("model_type", "architectures", "vocab_size")  # what must match (config.json)
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})  # safetensors' dtype spellings


class WeightUpdateRefused(RolloutError):
    """A weight update that would leave the served model incomplete or wrong: nothing was changed."""


@dataclass(frozen=True)
class Layout:
    """What a weight directory must hold to replace the served model: tensor name -> shape, and the
    config facts that must match. ``ignored``: names the start directory holds but the model has no
    parameter for (a buffer such as ``rotary_emb.inv_freq``, extra heads); an update may hold them
    too, and they are skipped, as transformers skipped them at start."""

    shapes: dict[str, tuple[int, ...]]
    config: dict[str, object]
    ignored: frozenset[str] = frozenset()

    def without(self, ignored: set[str]) -> Layout:
        return Layout({n: s for n, s in self.shapes.items() if n not in ignored}, self.config, frozenset(ignored))


def allowed_roots(dirs: list[str | Path] | tuple[str | Path, ...] | None) -> tuple[Path, ...] | None:
    """``--allowed-weight-dirs`` resolved once (they may not exist yet); None means any directory."""
    if not dirs:
        return None
    return tuple(Path(d).expanduser().resolve() for d in dirs)


def check_allowed(path: Path, roots: tuple[Path, ...] | None, what: str = "model_path") -> None:
    """Refuse a resolved ``path`` that lies outside every allowed root."""
    if roots is not None and not any(path == r or path.is_relative_to(r) for r in roots):
        raise WeightUpdateRefused(f"{what} {str(path)!r} is outside --allowed-weight-dirs "
                                  f"({', '.join(str(r) for r in roots)})")


def read_layout(hf_dir: str | Path) -> Layout:
    """The tensor names and shapes of a directory's safetensors headers, and its config facts (no
    tensor data is read): the layout of the directory a server starts from."""
    root = Path(hf_dir)
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(root.glob("*.safetensors")):
        for name, (shape, _) in _header(file).items():
            shapes[name] = shape
    return Layout(shapes=shapes, config=_config_facts(_read_config(root)))


def read_checkpoint(
    model_path: object, served: Layout, roots: tuple[Path, ...] | None = None
) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of ``model_path``, after the checks of the module docstring; raises
    :class:`WeightUpdateRefused` naming the first problem."""
    if not isinstance(model_path, str) or not model_path:
        raise WeightUpdateRefused(f"model_path: expected a directory path, got {model_path!r}")
    path = Path(model_path).expanduser()
    if not path.is_dir():
        raise WeightUpdateRefused(f"Failed to get weights iterator: model_path {model_path!r} is not a directory.")
    root = path.resolve(strict=True)
    check_allowed(root, roots)
    config_path = root / "config.json"
    if not config_path.is_file():
        raise WeightUpdateRefused(f"{model_path}: no config.json (expected a Hugging Face model directory)")
    check_allowed(config_path.resolve(), roots, "config.json")
    facts = _config_facts(_read_config(root))
    for key in CONFIG_KEYS:
        if facts.get(key) != served.config.get(key):
            raise WeightUpdateRefused(f"config.json: {key} {facts.get(key)!r} differs from the served model's "
                                      f"{served.config.get(key)!r}")
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise WeightUpdateRefused(f"{model_path}: no *.safetensors files")
    found: dict[str, tuple[tuple[int, ...], str, Path]] = {}
    for file in files:
        check_allowed(file.resolve(), roots, file.name)
        for name, (shape, dtype) in _header(file).items():
            if name in found:
                raise WeightUpdateRefused(f"tensor {name} appears in both {found[name][2].name} and {file.name}")
            found[name] = (shape, dtype, file)
    _check_index(root, found)
    # A server started from a directory without safetensors has no layout to compare names with;
    # then the copy's own coverage check (TransformersGenerator.load_full_state) is the only one.
    expected = served.shapes or {name: shape for name, (shape, _, _) in found.items()}
    for name in sorted((expected.keys() | found.keys()) - served.ignored):
        if name not in found:
            raise WeightUpdateRefused(f"missing tensor {name}: the directory must hold every parameter of the "
                                      "served model")
        shape, dtype, file = found[name]
        if name not in expected:
            raise WeightUpdateRefused(f"unknown tensor {name} in {file.name}: not a parameter of the served model")
        if shape != expected[name]:
            raise WeightUpdateRefused(f"{name}: shape {list(shape)} differs from the served model's "
                                      f"{list(expected[name])}")
        if dtype not in FLOAT_DTYPES:
            raise WeightUpdateRefused(f"{name}: dtype {dtype} is not a floating-point dtype")
    named: list[tuple[str, torch.Tensor]] = []
    for file in files:
        try:
            named.extend((n, t) for n, t in load_file(str(file)).items() if n not in served.ignored)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise WeightUpdateRefused(f"{file.name}: cannot be read ({_one_line(err)})") from None
    return named


def _header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    try:
        with safe_open(str(file), "pt") as handle:
            out = {}
            for name in handle.keys():
                piece = handle.get_slice(name)
                out[name] = (tuple(int(d) for d in piece.get_shape()), str(piece.get_dtype()))
            return out
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise WeightUpdateRefused(f"{file.name}: not a readable safetensors file ({_one_line(err)})") from None


def _check_index(root: Path, found: dict[str, tuple[tuple[int, ...], str, Path]]) -> None:
    index = root / INDEX_FILE
    if not index.is_file():
        return
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        assert isinstance(weight_map, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise WeightUpdateRefused(f"{INDEX_FILE}: expected JSON with a weight_map object") from None
    for name in sorted(weight_map.keys() | found.keys()):
        if name not in found:
            raise WeightUpdateRefused(f"{INDEX_FILE} lists {name} in {weight_map[name]!r}, which does not hold it")
        if name not in weight_map:
            raise WeightUpdateRefused(f"{found[name][2].name} holds {name}, which {INDEX_FILE} does not list")
        if weight_map[name] != found[name][2].name:
            raise WeightUpdateRefused(f"{INDEX_FILE} puts {name} in {weight_map[name]!r}, but it is in "
                                      f"{found[name][2].name}")


def _read_config(root: Path) -> dict:
    try:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise WeightUpdateRefused(f"config.json: cannot be read as JSON ({_one_line(err)})") from None
    if not isinstance(config, dict):
        raise WeightUpdateRefused("config.json: expected a JSON object")
    return config


def _config_facts(config: dict) -> dict[str, object]:
    return {key: config.get(key) for key in CONFIG_KEYS}


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__
