"""Hugging Face model directories: read them lazily (with checksums and a live-tensor count), and
write sharded safetensors one tensor at a time.

Reading: :meth:`HFCheckpoint.open` checks ``config.json`` and every safetensors header (via the
``safetensors`` library) before any tensor is read; :class:`TensorReader` then reads one tensor at
a time, keeps at most two files open, hashes each tensor it reads (sha256 of its bytes) and counts
in :class:`LiveTensors` what is still referenced, per source file, so that a test or benchmark
can assert that a conversion streams.

Writing: :class:`SafetensorsStreamWriter` writes a safetensors file whose tensors arrive one by one.
Hand-written (≈30 lines) because ``safetensors.torch.save_file`` needs every tensor of the file in
memory at once, i.e. up to a whole 5 GB shard; the format is the documented one (8-byte
little-endian header length, JSON header with ``dtype``/``shape``/``data_offsets``, then the raw
bytes in offset order) and the tests read every written file back with the ``safetensors`` library.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import weakref
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from luspo_megatron.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
HF_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size "5GB"

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
DTYPES: dict[str, torch.dtype] = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (C order); equal for bit-identical tensors of the same dtype."""
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data).hexdigest()


def nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class HFTensorInfo:
    name: str
    file: str  # file name inside the directory
    shape: tuple[int, ...]
    dtype: torch.dtype


class HFCheckpoint:
    """A Hugging Face model directory: ``config.json`` plus ``model.safetensors`` or shards listed
    in ``model.safetensors.index.json``. Opening reads only the config and the headers."""

    def __init__(self, directory: Path, config: dict[str, Any], tensors: dict[str, HFTensorInfo],
                 files: list[str]) -> None:
        self.directory = directory
        self.config = config
        self.tensors = tensors
        self.files = files  # in index order

    @classmethod
    def open(cls, directory: str | Path, flag: str = "--hf-dir") -> HFCheckpoint:
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(f"{flag}: {str(directory)!r} is not a directory")
        config = read_config(directory, flag)
        index = directory / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index}: expected JSON with a 'weight_map' ({type(err).__name__})") from None
            files = list(dict.fromkeys(weight_map.values()))
        elif (directory / SINGLE_NAME).is_file():
            weight_map, files = None, [SINGLE_NAME]
        else:
            raise CheckpointError(f"{flag}: no {SINGLE_NAME} or {INDEX_NAME} in {str(directory)!r}")
        tensors: dict[str, HFTensorInfo] = {}
        for file in files:
            for info in read_header(directory / file, file):
                if info.name in tensors:
                    raise CheckpointError(f"{directory}: tensor {info.name!r} is stored twice "
                                          f"({tensors[info.name].file} and {file})")
                tensors[info.name] = info
        if weight_map is not None:
            wrong = sorted(n for n, f in weight_map.items() if n not in tensors or tensors[n].file != f)
            if wrong:
                raise CheckpointError(f"{index}: {len(wrong)} tensors are not in the file the index names: {wrong}")
        return cls(directory, config, tensors, files)


def read_config(directory: Path, flag: str) -> dict[str, Any]:
    file = directory / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{flag}: no config.json in {str(directory)!r}")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file}: not valid JSON (line {err.lineno})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return config


def read_header(path: Path, file: str) -> list[HFTensorInfo]:
    """Names, shapes and dtypes of a safetensors file, from its header (validated by safetensors)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"{path}: missing safetensors file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            out = []
            for name in handle.keys():
                piece = handle.get_slice(name)
                dtype = piece.get_dtype()
                if dtype not in DTYPES:
                    raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
                out.append(HFTensorInfo(name, file, tuple(piece.get_shape()), DTYPES[dtype]))
            return out
    except SafetensorError as err:
        raise CheckpointError(f"{path}: corrupt safetensors header ({err})") from None


class LiveTensors:
    """Tensors still referenced anywhere, their bytes and the distinct tags (source files) they
    come from, with the peaks of each. Weak references: a tensor counts until the last reference
    to it, or to a view of it (a view keeps its base alive), is dropped."""

    def __init__(self) -> None:
        self._ids: set[int] = set()
        self._per_tag: Counter = Counter()
        self.bytes = 0
        self.peak_bytes = 0
        self.peak_tensors = 0
        self.peak_tags = 0

    def track(self, tensor: torch.Tensor, tag: str | None = None) -> torch.Tensor:
        """Count ``tensor`` (once) until it is freed; ``tag`` None: bytes only, no source file."""
        if id(tensor) in self._ids:
            return tensor
        size = tensor.numel() * tensor.element_size()
        self._ids.add(id(tensor))
        if tag is not None:
            self._per_tag[tag] += 1
        self.bytes += size
        weakref.finalize(tensor, self._released, id(tensor), tag, size)
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        self.peak_tensors = max(self.peak_tensors, len(self._ids))
        self.peak_tags = max(self.peak_tags, len(+self._per_tag))
        return tensor

    def _released(self, key: int, tag: str | None, size: int) -> None:
        self._ids.discard(key)
        if tag is not None:
            self._per_tag[tag] -= 1
        self.bytes -= size


class TensorReader:
    """Reads tensors of an :class:`HFCheckpoint` one at a time, keeping at most ``max_open``
    files open. ``checksums``: sha256 of every tensor read. ``live``: a :class:`LiveTensors` in
    which every tensor read is tagged with its file (a converter adds what it derives from them)."""

    def __init__(self, checkpoint: HFCheckpoint, max_open: int = 2, live: LiveTensors | None = None) -> None:
        self.checkpoint = checkpoint
        self.max_open = max_open
        self._open: OrderedDict[str, Any] = OrderedDict()
        self.checksums: dict[str, str] = {}
        self.bytes_read = 0
        self.live = live or LiveTensors()

    def _handle(self, file: str):
        from safetensors import safe_open

        if file in self._open:
            self._open.move_to_end(file)
            return self._open[file]
        while len(self._open) >= self.max_open:
            self._open.popitem(last=False)[1].__exit__(None, None, None)
        handle = safe_open(str(self.checkpoint.directory / file), framework="pt")
        handle.__enter__()
        self._open[file] = handle
        return handle

    def get(self, name: str) -> torch.Tensor:
        info = self.checkpoint.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.checkpoint.directory}: no tensor {name!r}")
        tensor = self._handle(info.file).get_tensor(name)
        self.bytes_read += tensor.numel() * tensor.element_size()
        if name not in self.checksums:
            self.checksums[name] = tensor_sha256(tensor)
        return self.live.track(tensor, info.file)

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].__exit__(None, None, None)


# ---------------------------------------------------------------------------------------- writing
@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return nbytes(self.shape, self.dtype)


class SafetensorsStreamWriter:
    """Writes one safetensors file whose tensors (``specs``, in this order) arrive one at a time."""

    def __init__(self, path: Path, specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.specs = list(specs)
        header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for spec in self.specs:
            header[spec.name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs[self._next]
        if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise RuntimeError(f"{self.path.name}: expected {spec} next, got {name} "
                               f"{tuple(tensor.shape)} {tensor.dtype}")
        self._file.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.specs):
            raise RuntimeError(f"{self.path.name}: {len(self.specs) - self._next} tensors were never written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def plan_shards(specs: Sequence[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Cut ``specs`` (in order) into files of at most ``max_bytes`` (a larger tensor gets a file of
    its own), as transformers' ``save_pretrained(max_shard_size=...)`` does."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return [s for s in shards if s]


def shard_file_names(count: int) -> list[str]:
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_index(directory: Path, shards: Sequence[Sequence[TensorSpec]], names: Sequence[str]) -> None:
    weight_map = {spec.name: file for shard, file in zip(shards, names) for spec in shard}
    total = sum(spec.nbytes for shard in shards for spec in shard)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def parse_size(text: str) -> int:
    """'5GB' -> 5·10^9, '500MB', '2GiB', '1000' (bytes): transformers' max_shard_size spelling."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    upper = text.strip().upper()
    unit = next((u for u in units if upper.endswith(u)), None)
    number, factor = (upper[: -len(unit)], units[unit]) if unit else (upper, 1)
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise CheckpointError(f"--max-shard-size: expected a size such as 5GB or 500MB, got {text!r}") from None
    if value <= 0:
        raise CheckpointError(f"--max-shard-size: expected a positive size, got {text!r}")
    return value
