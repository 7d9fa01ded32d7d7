"""The single-host backend: one SQLite file in WAL mode, shared by serve and its workers.

Every write is one `BEGIN IMMEDIATE` transaction, so concurrent claimers serialise instead of
deadlocking. The clock is the host's (the one host is the database), injectable for tests.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from node.state import schema
from node.state.database import Params, T
from node.state.errors import StateError, StateFull, disk_full


class _Transaction:
    def __init__(self, db: sqlite3.Connection, now: float) -> None:
        self._db, self.now = db, now

    def clock(self) -> float:
        return self.now  # writers are serialised: nothing commits during this transaction

    def execute(self, sql: str, params: Params = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, params)

    def executemany(self, sql: str, rows: list[Params]) -> None:
        self._db.executemany(sql, rows)


class SqliteDatabase:
    """One connection per object, shared by the threads of one process under a lock."""

    claim_lock = ""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.description = str(path)
        self._clock = clock
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as exc:
            raise StateError(f"cannot open state database {path} ({exc}): check storage.state_dir "
                             "exists and is writable by the service user") from None
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.create_function("greatest", -1, max, deterministic=True)
        self._db.create_function("strpos", 2, _strpos, deterministic=True)
        self._migrate()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def now(self) -> float:
        return self._clock()

    def schema_version(self) -> int:
        return self.read("PRAGMA user_version")[0][0]

    def read(self, sql: str, params: Params = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def write(self, body: Callable[[_Transaction], T]) -> T:
        """Run `body` in an immediate transaction; a COMMIT that fails (a full disk) is rolled back too,
        so the connection stays usable, and a full disk is raised as StateFull naming the fix."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    value = body(_Transaction(self._db, self._clock()))
                    self._db.execute("COMMIT")
                    return value
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as exc:
                if disk_full(exc) and not isinstance(exc, StateFull):
                    raise StateFull(f"state database {self.description}: the disk is full: free space on its "
                                    "filesystem (the node carries on by itself once there is room)") from exc
                raise

    def _migrate(self) -> None:
        def migrate(tx: _Transaction) -> None:
            version = tx.execute("PRAGMA user_version").fetchone()[0]
            if version > schema.SCHEMA_VERSION:
                raise StateError(f"state database {self.description} has schema version {version}, newer than "
                                 f"this paraspinal-node knows ({schema.SCHEMA_VERSION}): upgrade paraspinal-node")
            for number in range(version, schema.SCHEMA_VERSION):
                for statement in schema.statements(schema.SQLITE[number]):
                    tx.execute(statement)
                tx.execute(f"PRAGMA user_version={number + 1}")

        self.write(migrate)


def _strpos(text: str | None, part: str | None) -> int | None:
    """PostgreSQL's strpos: the 1-based place of `part` in `text`, 0 when absent."""
    if text is None or part is None:
        return None
    return text.find(part) + 1
