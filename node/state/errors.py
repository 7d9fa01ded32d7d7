"""The state's errors, shared by both backends and the store."""

from __future__ import annotations

import errno
import sqlite3


class StateError(Exception):
    """The state database cannot be used; the message says why and what to do."""


class StateFull(StateError, sqlite3.OperationalError):
    """A write failed because the disk is full: callers log it once and back off (it is still an sqlite3.Error)."""


def disk_full(exc: BaseException) -> bool:
    """Whether an error means the disk (or quota) is full, from either database or from a file write."""
    if isinstance(exc, StateFull):
        return True
    if isinstance(exc, sqlite3.OperationalError):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
