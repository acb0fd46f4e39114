"""Crash-safe checkpoint directories: write to ``<name>.tmp``, rename when complete.

Training checkpoints (``save_dir``)::

    iter_0000003/         complete: renamed from iter_0000003.tmp after every rank finished
    iter_0000006.tmp/     a save that never finished (crash, SIGKILL): skipped and reported
    latest                the newest committed step, replaced atomically ("6\\n")
    verified              the last checkpoint a load verified (``integrity``): pruning keeps it

A directory without the ``.tmp`` suffix is complete by construction: the rename is the commit, and
POSIX ``rename`` of a directory is atomic. ``latest`` is written to a temporary file and
``os.replace``-d, so it is always either the old or the new step. Both are fsync-ed (file, then
parent directory) so a power loss cannot reorder them. Pure Python: no torch, no megatron.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from luspo_megatron.errors import CheckpointError
from luspo_megatron.runtime.durable import replace_dir, write_file_atomic

logger = logging.getLogger(__name__)

LATEST = "latest"
TMP_SUFFIX = ".tmp"
_ITER = re.compile(r"^iter_(\d{7,})$")
_ITER_TMP = re.compile(r"^iter_(\d{7,})\.tmp$")


def iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def tmp_path(path: Path) -> Path:
    return path.with_name(path.name + TMP_SUFFIX)


# Publishing a directory by rename is shared with the rollout weight directories (durable.py).
commit_dir = replace_dir


def write_latest(root: Path, step: int) -> None:
    write_file_atomic(root / LATEST, f"{step}\n")


def complete_steps(root: Path) -> list[int]:
    """Steps with a committed ``iter_XXXXXXX`` directory, ascending."""
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _ITER.match(p.name)))


def incomplete_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _ITER_TMP.match(p.name))


def read_latest(root: Path) -> int | None:
    """The step ``latest`` names; None when there is no ``latest``. Its content is only ever a
    step number (written whole and renamed into place), so anything else is damage: an error
    rather than a guess at which checkpoint was meant."""
    file = root / LATEST
    if not file.is_file():
        return None
    with open(file, "rb") as handle:
        text = handle.read(65).strip()
    if not (text.isdigit() and len(text) <= 20):  # bytes.isdigit: ASCII digits only; ≤ 20: any int64
        raise CheckpointError(f"--load: {file} is damaged: expected a step number, got {text[:20]!r}; "
                              f"delete it to load the newest checkpoint that verifies, or pass --ckpt-step N")
    return int(text)


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a load will use, and what it passed over on the way."""

    step: int
    path: Path
    skipped: tuple[Path, ...] = ()  # incomplete .tmp directories, never loaded
    notes: tuple[str, ...] = field(default=())  # one line each: what was skipped and why

    def report(self) -> str:
        return "; ".join((*self.notes, f"loading {self.path}"))


def find_resume_point(root: str | Path, step: int | None = None) -> ResumePoint | None:
    """The complete checkpoint to load from ``root``: ``step`` if given, else the one ``latest``
    names, else (``latest`` missing or pointing at a deleted directory) the newest complete one.
    None when ``root`` has no complete checkpoint and no step was asked for. Incomplete ``.tmp``
    directories are never returned; they are listed in ``skipped``, with a note."""
    root = Path(root)
    complete = complete_steps(root)
    skipped = tuple(incomplete_dirs(root))
    notes = [f"skipping incomplete checkpoint {p.name} (a save that never finished)" for p in skipped]
    if step is not None:
        if step not in complete:
            where = " (only an incomplete .tmp save exists)" if tmp_path(root / iter_name(step)) in skipped else ""
            raise CheckpointError(f"--ckpt-step: no complete checkpoint for step {step} in {str(root)!r}{where}; "
                                  f"complete steps: {complete}")
        return ResumePoint(step, root / iter_name(step), skipped, tuple(notes))
    if not complete:
        return None
    latest = read_latest(root)
    chosen = complete[-1]
    if latest is None:
        notes.append(f"no readable '{LATEST}' file; using the newest complete checkpoint {iter_name(chosen)}")
    elif latest in complete:
        chosen = latest
    else:
        notes.append(f"'{LATEST}' names step {latest}, which has no complete checkpoint; "
                     f"using the newest complete one, {iter_name(chosen)}")
    return ResumePoint(chosen, root / iter_name(chosen), skipped, tuple(notes))


def prune(root: Path, keep_last: int, keep: int, protect: int | None = None) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (never step ``keep``, the one
    just saved, nor ``protect``, the last one a load verified), and the incomplete saves of steps
    up to ``keep`` (abandoned by a crash). Returns what was deleted."""
    removed = []
    complete = complete_steps(root)
    for step in complete[: max(len(complete) - keep_last, 0)]:
        if step not in (keep, protect):
            removed.append(root / iter_name(step))
    for path in incomplete_dirs(root):
        if int(_ITER_TMP.match(path.name).group(1)) <= keep:
            removed.append(path)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed
