"""Content hashes of checkpoint files: recorded at save in ``checksums.json``, checked before a load.

    iter_0000003/
        __0_0.distcp  __1_0.distcp      tensor files (one per rank): hashed while they are written
        .metadata  metadata.json        torch DCP's and megatron's metadata, and common.pt (the step,
        common.pt                       the scheduler, our extra state): hashed by rank 0 after fsync
        checksums.json                  {"files": {name: {"size": bytes, "sha256": hex}}, ...}

``checksums.json`` is written into ``iter_XXXXXXX.tmp`` before the rename that commits it
(``atomic``), so a committed checkpoint of this version always has one; a checkpoint without it
is either older (``format_version`` 1 in common.pt: loaded unverified, with a warning) or damaged.

Hashing costs no second pass over the tensor bytes at save: each rank's writer
(``dist_save``) feeds every byte it writes through :class:`HashingWriter`. The small files that
torch DCP and megatron write themselves (no hook into their writers) are read back once, after an
fsync, by rank 0. At load every rank hashes a slice of the files (rank r: files r, r + world, ...)
and the ranks exchange what they found, so all of them take the same decision.

Why ``hashlib.sha256`` and not a library: it is the standard library's (OpenSSL's, ~1–2 GB/s per
core), it streams (``update`` per write, ``file_digest`` in chunks), and it is the digest
``sha256sum`` prints, so a file can be checked by hand. A faster non-cryptographic hash (xxhash,
crc32c) would add a dependency for a cost that is small next to writing the bytes.

``verified`` (next to ``latest``) records the last checkpoint a load verified, with the sha256 of
its checksums.json (so that a later save of the same step does not inherit the mark): ``prune``
keeps it even when it is no longer among the newest ``--keep-last``. Pure Python: no torch (the
ranks' exchange imports torch.distributed only when a process group exists).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from luspo_megatron.runtime.durable import fsync_path, write_file_atomic

logger = logging.getLogger(__name__)

CHECKSUMS = "checksums.json"
VERIFIED = "verified"
FORMAT = "luspo-megatron/checkpoint-checksums"
VERSION = 1


class HashingWriter:
    """A binary stream that hashes every byte written through it (appends only: ``tell`` is the
    number of bytes written, which is what torch DCP's item writer asks for)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")  # bytes, bytearray, a BytesIO buffer: counted in bytes
        written = self._stream.write(view)
        assert written is None or written == len(view), "short write on a checkpoint file"
        self._sha.update(view)
        self.size += len(view)
        return len(view)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._stream.flush()

    def fileno(self) -> int:
        return self._stream.fileno()

    def record(self) -> dict[str, Any]:
        """``{"size", "sha256"}`` of what was written; checked against the file itself, which
        must hold exactly these bytes (nothing seeked back and rewrote part of it)."""
        size = os.fstat(self.fileno()).st_size
        assert size == self.size, f"checkpoint file holds {size} bytes, {self.size} were written through the hash"
        return {"size": self.size, "sha256": self._sha.hexdigest()}


def file_record(path: Path) -> dict[str, Any]:
    """``{"size", "sha256"}`` of a file, read in chunks (``hashlib.file_digest``), never whole."""
    with open(path, "rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
        return {"size": os.fstat(file.fileno()).st_size, "sha256": digest}


def seal(directory: Path, hashed: dict[str, dict[str, Any]], step: int) -> dict[str, dict[str, Any]]:
    """Write ``directory/checksums.json`` (rank 0, before the commit). ``hashed``: the records of
    the tensor files, from every rank's writer; every other file of the directory (torch DCP's and
    megatron's metadata, common.pt) is fsync-ed and hashed here. Returns the records."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in directory.iterdir() if p.name != CHECKSUMS):
        if not path.is_file():
            raise RuntimeError(f"unexpected entry {path} in a checkpoint being saved")
        if path.name in hashed:
            files[path.name] = hashed[path.name]
            continue
        fsync_path(path)  # megatron does not fsync common.pt / metadata.json: durable before the rename
        files[path.name] = file_record(path)
    missing = sorted(set(hashed) - set(files))
    assert not missing, f"files hashed by the writers are not in {directory}: {missing}"
    body = {"format": FORMAT, "version": VERSION, "step": step, "algorithm": "sha256", "files": files}
    target = directory / CHECKSUMS
    with open(target, "w") as out:
        out.write(json.dumps(body, indent=1, sort_keys=True) + "\n")
        out.flush()
        os.fsync(out.fileno())
    fsync_path(directory)
    return files


class _Unreadable(Exception):
    """checksums.json exists but cannot be used."""


def read_checksums(directory: Path) -> dict[str, dict[str, Any]] | None:
    """The file records of ``directory/checksums.json``; None when there is none."""
    path = directory / CHECKSUMS
    if not path.exists():
        return None
    try:
        body = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bad UTF-8
        raise _Unreadable(f"{path}: unreadable ({type(err).__name__}: {err})") from None
    files = body.get("files") if isinstance(body, dict) else None
    ok = (isinstance(body, dict) and body.get("format") == FORMAT and body.get("algorithm") == "sha256"
          and isinstance(files, dict) and all(
              isinstance(n, str) and "/" not in n and n not in ("", ".", "..") and isinstance(r, dict)
              and isinstance(r.get("size"), int) and isinstance(r.get("sha256"), str) for n, r in files.items()))
    if not ok:
        raise _Unreadable(f"{path}: not a {FORMAT} file")
    return files


def _size_problem(directory: Path, name: str, record: dict[str, Any]) -> str | None:
    path = directory / name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path}: missing (listed in {CHECKSUMS})"
    if size != record["size"]:
        return f"{path}: {size} bytes, {CHECKSUMS} records {record['size']} (truncated, extended or replaced)"
    return None


def _content_problem(directory: Path, name: str, record: dict[str, Any]) -> str | None:
    path = directory / name
    try:
        found = file_record(path)
    except OSError as err:
        return f"{path}: unreadable ({err.strerror or err})"
    if found["sha256"] != record["sha256"]:
        return (f"{path}: sha256 {found['sha256'][:16]}…, {CHECKSUMS} records {record['sha256'][:16]}… "
                f"(the content changed after it was saved)")
    return _size_problem(directory, name, record)


@dataclass(frozen=True)
class Verdict:
    """What checking a checkpoint directory found."""

    status: Literal["verified", "failed", "unrecorded"]  # unrecorded: no checksums.json
    problem: str | None = None  # one line naming the file (status "failed")


def _rank_world() -> tuple[int, int]:
    try:
        import torch.distributed as dist
    except ImportError:  # pure-Python callers
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _first_problem(mine: list[tuple[int, str]]) -> str | None:
    """The problem of the lowest file index found on any rank (every rank gets the same)."""
    rank, world = _rank_world()
    found = list(mine)
    if world > 1:
        import torch.distributed as dist

        gathered: list = [None] * world
        dist.all_gather_object(gathered, mine)
        found = [item for part in gathered for item in part]
    return min(found)[1] if found else None


def verify(directory: str | Path) -> Verdict:
    """Check every file listed in ``directory/checksums.json``: present, of the recorded size, of
    the recorded sha256. Collective when a process group exists (each rank hashes its slice of the
    files; all ranks return the same verdict). Files the list does not name are not part of the
    checkpoint (torch DCP reads only what its ``.metadata`` names, and that file is listed)."""
    directory = Path(directory)
    try:
        files = read_checksums(directory)
    except _Unreadable as err:
        return Verdict("failed", str(err))
    if files is None:
        return Verdict("unrecorded")
    rank, world = _rank_world()
    names = sorted(files)
    # sizes first (a stat each): a truncated or deleted file is named without hashing anything
    mine = [(i, p) for i, n in enumerate(names) if i % world == rank and (p := _size_problem(directory, n, files[n]))]
    problem = _first_problem(mine)
    if problem is None:
        mine = [(i, p) for i, n in enumerate(names)
                if i % world == rank and (p := _content_problem(directory, n, files[n]))]
        problem = _first_problem(mine)
    return Verdict("failed", problem) if problem else Verdict("verified")


# ------------------------------------------------------------------ the last verified checkpoint
def _fingerprint(checkpoint_dir: Path) -> str | None:
    path = checkpoint_dir / CHECKSUMS
    return file_record(path)["sha256"] if path.is_file() else None


def record_verified(root: Path, checkpoint_dir: Path, step: int) -> None:
    """Mark ``checkpoint_dir`` (step ``step`` of ``root``) as the last one a load verified (rank 0).
    Best effort: a read-only ``--load`` directory only loses the mark, which protects it from
    pruning, and nothing prunes a directory the run cannot write."""
    fingerprint = _fingerprint(checkpoint_dir)
    if fingerprint is None:
        return
    try:
        write_file_atomic(root / VERIFIED, f"{step} {fingerprint}\n")
    except OSError as err:
        logger.info("could not record the verified checkpoint in %s: %s", root, err)


def last_verified(root: Path, checkpoint_dir_of) -> int | None:
    """The step ``verified`` names, if that checkpoint still exists with the same checksums.json
    (``checkpoint_dir_of(step)``: its directory). None otherwise, or when the mark is unreadable."""
    try:
        step_text, fingerprint = (root / VERIFIED).read_text().split()
        step = int(step_text)
    except (OSError, ValueError):
        return None
    path = checkpoint_dir_of(step)
    return step if path.is_dir() and _fingerprint(path) == fingerprint else None
