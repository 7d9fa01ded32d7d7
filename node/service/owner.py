"""One owner per state dir: `serve` holds an exclusive lock on <state_dir>/serve.lock.

Two serve processes on one state dir would each complete, process and send every series (results
reached the PACS twice). The lock is an flock, so it goes with the process, however it dies.
Workers do not take it: a worker (under serve's supervisor, or a paraspinal-worker@ unit) works
only while some serve holds it, which it checks with a shared probe of the same lock between jobs,
and stops when the state database it opened was replaced underneath it.

A missing or empty state.sqlite next to a spool or outbox with files is refused at start: a fresh
database would reprocess and resend everything still in the spool. `serve --init` accepts it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = "serve.lock"
_ACQUIRE_S = 2.0  # a worker's probe holds the shared lock for an instant: try again for this long
PRIVATE_UMASK = 0o027  # files 0640, folders 0750: patient IDs and measurements are not for every local user


class OwnerError(Exception):
    """The state dir cannot be owned by this serve; the message names the fix."""


class StateDirOwner:
    """Held by serve from before the database opens until after it closes."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        deadline = time.monotonic() + _ACQUIRE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _read_pid(fd)
                    os.close(fd)
                    raise OwnerError(
                        f"state dir {self.path.parent} is in use by another serve{holder}: stop it first "
                        "(systemctl stop paraspinal-node), or give this node its own storage.state_dir") from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def owner_alive(state_dir: Path) -> bool:
    """Whether a serve holds the state dir now (a shared probe fails while it holds the exclusive lock)."""
    try:
        fd = os.open(Path(state_dir) / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a probe that succeeded
    return False


def check_state_present(database: Path, spool_dir: Path, outbox_dir: Path, init: bool) -> None:
    """Refuse a missing or empty database beside received images or results, unless `init`."""
    if init or (database.exists() and database.stat().st_size > 0):
        return
    held = [folder.name for folder in (spool_dir, outbox_dir) if _has_files(folder)]
    if held:
        state = "empty" if database.exists() else "missing"
        raise OwnerError(
            f"{database} is {state} but {' and '.join(held)} in {database.parent} hold files: restore state.sqlite "
            "from a backup, or start once with `paraspinal-node serve --init` to rebuild it (every series still "
            "in the spool is then processed and sent again)")


def make_private(*paths: Path) -> None:
    """Take group-write and every permission for others off files an older start left readable."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & PRIVATE_UMASK:
                path.chmod(mode & ~PRIVATE_UMASK)


def _has_files(folder: Path) -> bool:
    if not folder.is_dir():
        return False
    return any(entry.is_file() for entry in folder.rglob("*"))


def _read_pid(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(os.pread(fd, 32, 0).decode().strip())
        return f" (pid {pid})"
    return ""


class DatabaseReplaced(Exception):
    """The state database file this process opened is no longer the one at its path."""


class OwnerCheck:
    """A worker's check between jobs: work only while a serve owns the state dir and the database is the same file.

    Logs once when the worker starts waiting and once when it resumes.
    """

    def __init__(self, state_dir: Path, database: Path) -> None:
        self._state_dir = Path(state_dir)
        self._database = Path(database)
        self._identity = _identity(self._database)
        self._waiting = False

    def __call__(self) -> bool:
        if _identity(self._database) != self._identity:
            raise DatabaseReplaced(f"{self._database} was replaced or removed while this worker used it: "
                                   "the worker exits and its supervisor (serve or systemd) starts it again")
        alive = owner_alive(self._state_dir)
        if alive == self._waiting:
            self._waiting = not alive
            if alive:
                log.info("event=worker_resumed reason=%s", "serve owns the state dir again")
            else:
                log.warning("event=worker_waiting state_dir=%s reason=%s", self._state_dir,
                            "no serve owns this state dir: start paraspinal-node serve")
        return alive


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino
