"""Which training checkpoint a load uses, and whether it can be trusted and fits the model.

    chosen = choose(root, point, step, verify=True)   # collective; CheckpointError if none will do
    check_fits(chosen, model_request)                  # before any tensor is read
    with readable(chosen): dist_checkpointing.load(...) # a damaged unverified file: one-line error

- With ``--ckpt-step N`` the checkpoint is N, or a :class:`CheckpointError` naming what is wrong.
- Without it, the checkpoint ``latest`` names; if that one fails verification (or its common.pt
  cannot be read), the next older complete one, and so on, each skipped with a warning that names
  the checkpoint, the file and why. None verifying is an error naming the newest one's problem.
- A checkpoint without ``checksums.json``: written before checksums (``format_version`` 1 in its
  common.pt) it loads unverified, with a warning; written by this version it counts as damaged.
- A checkpoint that verifies but holds another model (other tensor names or shapes) is an error,
  not a reason to fall back: every checkpoint of the directory holds the same model.

Every rank calls these; the decisions come from ``integrity.verify`` (whose verdict all ranks
share) and from reading the same files, so all ranks take the same path.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from luspo_megatron.checkpoint import atomic, integrity
from luspo_megatron.errors import CheckpointError

logger = logging.getLogger(__name__)

# format_version in common.pt: 1 = before checksums.json, 2 = every checkpoint carries one.
FORMAT_VERSION = 2
KNOWN_FORMATS = (1, 2)


@dataclass(frozen=True)
class Chosen:
    """The checkpoint a load reads."""

    step: int | None  # None: a converted checkpoint (not a training step)
    path: Path
    common: dict[str, Any]  # its common.pt
    verified: bool  # its files matched checksums.json
    passed_over: tuple[str, ...] = ()  # one line per newer checkpoint skipped as damaged

    @property
    def where(self) -> str:
        return describe(self.step, self.path)


def describe(step: int | None, path: Path) -> str:
    return f"checkpoint {path}" if step is None else f"checkpoint step {step} ({path})"


def _rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _warn(message: str) -> None:
    if _rank0():
        logger.warning(message)


def error_text(err: BaseException) -> str:
    """``Type: first line`` of an error raised while reading a file; for torch DCP's
    CheckpointException (every rank's failures, with tracebacks) the first rank's own error."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        err = first[0] if isinstance(first, tuple) else first
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}".rstrip(": ")


def _read_common(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        common = dist_checkpointing.load_common_state_dict(str(path))
    except (Exception, CheckpointException) as err:  # damaged bytes raise whatever the unpickler meets
        return None, f"{path / 'common.pt'}: unreadable ({error_text(err)})"
    meta = common.get("luspo") if isinstance(common, dict) else None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version not in KNOWN_FORMATS:
        return None, (f"{path / 'common.pt'}: not a luspo-megatron training checkpoint "
                      f"(format_version {version!r}, expected one of {KNOWN_FORMATS})")
    return common, None


def _check(step: int, path: Path, verify: bool) -> tuple[dict[str, Any] | None, str | None, bool]:
    """(common.pt, problem, verified) of one checkpoint directory."""
    verdict = integrity.verify(path) if verify else None
    if verdict is not None and verdict.status == "failed":
        return None, verdict.problem, False
    common, problem = _read_common(path)
    if problem is not None:
        return None, problem, False
    if verdict is not None and verdict.status == "unrecorded":
        if common["luspo"]["format_version"] >= 2:
            return None, f"{path / integrity.CHECKSUMS}: missing (this checkpoint format always writes one)", False
        _warn(f"--load: {describe(step, path)} was written before checkpoints carried checksums "
              f"(format_version 1): loading it unverified")
    return common, None, verdict is not None and verdict.status == "verified"


def choose(root: Path, point: atomic.ResumePoint, step: int | None, verify: bool) -> Chosen:
    """The checkpoint to load: ``point`` (what ``latest`` or ``--ckpt-step`` names), or without an
    asked step, the newest older complete one that verifies (module docstring)."""
    if not verify:
        _warn("--no-verify-checkpoint: loading without checking the files against checksums.json")
    older = [s for s in reversed(atomic.complete_steps(root)) if s < point.step]
    candidates = [point.step] if step is not None else [point.step, *older]
    passed_over: list[str] = []
    for candidate in candidates:
        path = root / atomic.iter_name(candidate)
        common, problem, verified = _check(candidate, path, verify)
        if problem is None:
            if verified and _rank0():
                integrity.record_verified(root, path, candidate)
            return Chosen(candidate, path, common, verified, tuple(passed_over))
        if step is not None:
            raise CheckpointError(f"--ckpt-step {step}: {describe(candidate, path)} is damaged: {problem}")
        passed_over.append(f"{describe(candidate, path)} is damaged: {problem}")
        _warn(f"--load: {describe(candidate, path)} is damaged, trying the next older checkpoint: {problem}")
    raise CheckpointError(f"--load: no checkpoint in {root} can be loaded; the newest: {passed_over[0]}")


def _model_shapes(model_request: Any) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> global shape of every tensor a model's sharded state dict asks for."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    shapes: dict[str, tuple[int, ...]] = {}
    for leaf in nested_values(model_request):
        for item in nested_values(leaf.build()) if isinstance(leaf, ShardedTensorFactory) else [leaf]:
            if isinstance(item, ShardedTensor):
                shapes[item.key] = tuple(item.global_shape)
    return shapes


def check_fits(chosen: Chosen, model_request: Any, flag: str = "--load") -> None:
    """Refuse, before reading any tensor, a checkpoint whose model tensors (names and global
    shapes, from torch DCP's ``.metadata``) are not exactly the ones ``model_request`` (this
    model's sharded state dict) asks for. A checkpoint with *more* tensors is another model too
    (megatron would load the common part silently)."""
    from torch.distributed.checkpoint import FileSystemReader, TensorStorageMetadata

    with readable(chosen, flag):
        metadata = FileSystemReader(str(chosen.path)).read_metadata()
    stored = {k: tuple(m.size) for k, m in metadata.state_dict_metadata.items()
              if isinstance(m, TensorStorageMetadata) and not k.startswith("optimizer.")}
    wanted = _model_shapes(model_request)
    differ = sorted(k for k in set(stored) & set(wanted) if stored[k] != wanted[k])
    missing, extra = sorted(set(wanted) - set(stored)), sorted(set(stored) - set(wanted))
    if not (differ or missing or extra):
        return
    details = []
    if differ:
        details.append(f"{len(differ)} tensors differ in shape, e.g. {differ[0]} is {stored[differ[0]]} there, "
                       f"{wanted[differ[0]]} in this model")
    if missing:
        details.append(f"{len(missing)} tensors of this model are not in it, e.g. {missing[0]}")
    if extra:
        details.append(f"{len(extra)} tensors in it are not in this model, e.g. {extra[0]}")
    raise CheckpointError(f"{flag}: {chosen.where} holds another model: {'; '.join(details)}")


@contextlib.contextmanager
def readable(chosen: Chosen, flag: str = "--load") -> Iterator[None]:
    """Turn a reader's error on an *unverified* checkpoint (older format, or
    ``--no-verify-checkpoint``) into a one-line CheckpointError: there a damaged file shows up
    only as whatever torch / megatron raise on its bytes. On a verified checkpoint such an error
    is a bug and keeps its traceback."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except (Exception, CheckpointException) as err:
        if chosen.verified or isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{flag}: {chosen.where} could not be read ({error_text(err)}); it was not "
                              f"verified against checksums, so a damaged file is the likely cause") from err
