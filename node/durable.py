"""Crash-safe file writes: a reader, or a restart after power loss, never sees half a file."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

TEMP_SUFFIX = ".partial"  # temp files are hidden and end so, so leftovers can be found and removed


def write_atomic(target: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename over `target`, fsync the folder."""
    temp = target.parent / f".{target.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        with os.fdopen(fd, "wb", closefd=True) as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def make_dirs(folder: Path) -> None:
    """Create `folder` and its missing parents, fsyncing each parent so the new entries survive a crash."""
    missing = []
    current = Path(folder)
    while not current.exists():
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
        fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
