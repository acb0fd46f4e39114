"""Durable file operations shared by everything that writes directories others read: training
checkpoints (``checkpoint/``) and the HF weight directories the rollout engines load
(``rollout/weight_sync.py``). Pure ``os``: no torch, no megatron, so every layer may use it.

A directory is published by renaming a finished temporary sibling onto its final name; POSIX
``rename`` is atomic, so a reader sees the old or the new directory, never half of one. Files and
the parent directory are fsync-ed so that a power loss cannot reorder the writes and the rename.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory (a directory's fsync makes its entries, e.g. a rename, durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: Path, text: str) -> None:
    """Write a small file so that readers see the old or the new content, never part of it: a temporary
    sibling (``<name>.tmp``), fsync-ed, renamed onto ``path``, then the directory fsync-ed."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename a finished ``tmp`` directory to ``final``, replacing an existing ``final`` (moved
    aside first, deleted after), so that at every instant ``final`` is either the old or the new
    complete directory."""
    old = None
    if final.exists():
        old = final.with_name(final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
