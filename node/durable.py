"""Crash-safe file writes: a reader, or a restart after power loss, never sees half a file."""

from __future__ import annotations

import mmap
import os
import secrets
import threading
from collections.abc import Sequence
from pathlib import Path

Bytes = bytes | bytearray | memoryview
TEMP_SUFFIX = ".partial"  # temp files are hidden and end so, so leftovers can be found and removed
DIRECT_MAX_BYTES = 64 << 20
_ALIGNMENT = 4096  # O_DIRECT needs buffer, offset and length aligned to the logical block size
_thread_buffers = threading.local()


def write_atomic(target: Path, data: Bytes | Sequence[Bytes], direct: bool = False) -> None:
    """Temp file in the same folder, fsync, rename over `target`, fsync the folder.

    `data` may be consecutive byte ranges (a received header and body), written without joining them.
    `direct` writes with O_DIRECT (see `supports_direct_io`): the data goes to disk without taking fresh
    page-cache memory, and fsync then has only metadata left to flush. Files larger than
    `DIRECT_MAX_BYTES` are written through the cache.
    """
    parts = [memoryview(data).cast("B")] if isinstance(data, (bytes, bytearray, memoryview)) else [
        memoryview(part).cast("B") for part in data]
    direct = direct and sum(len(part) for part in parts) <= DIRECT_MAX_BYTES
    temp = target.parent / f".{target.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | (os.O_DIRECT if direct else 0), 0o640)
    try:
        try:
            if direct:
                _write_direct(fd, parts)
            else:
                _write_all(fd, parts)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def supports_direct_io(folder: Path) -> bool:
    """Whether `folder`'s filesystem takes aligned O_DIRECT writes (tmpfs and some network filesystems do not)."""
    probe = folder / f".direct-probe.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o640)
        try:
            _write_direct(fd, [memoryview(b"probe")])
        finally:
            os.close(fd)
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)
    return True


def _write_all(fd: int, parts: list[memoryview]) -> None:
    """One writev for all parts, continuing after short writes (signals, large buffers)."""
    views = list(parts)
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def _write_direct(fd: int, parts: list[memoryview]) -> None:
    """Copy into this thread's aligned buffer, write whole blocks, then cut the file to its length."""
    length = sum(len(part) for part in parts)
    padded = -(-length // _ALIGNMENT) * _ALIGNMENT
    buffer = _aligned_buffer(padded)
    offset = 0
    for part in parts:
        buffer[offset:offset + len(part)] = part
        offset += len(part)
    buffer[length:padded] = bytes(padded - length)  # no bytes of an earlier image in the last block
    _write_all(fd, [memoryview(buffer)[:padded]])
    os.ftruncate(fd, length)


def _aligned_buffer(size: int) -> mmap.mmap:
    """A page-aligned buffer per thread, reused so that its memory is touched once, not per image."""
    buffer = getattr(_thread_buffers, "buffer", None)
    if buffer is None or len(buffer) < size:
        buffer = _thread_buffers.buffer = mmap.mmap(-1, max(size, 1 << 20))
    return buffer


def make_dirs(folder: Path, root: Path | None = None) -> None:
    """Create `folder` and its missing parents (below `root`, when given), fsyncing each parent so the
    new entries survive a crash."""
    missing = []
    current = Path(folder)
    while current != root and not current.exists():
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
