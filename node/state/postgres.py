"""The scale-out backend: one PostgreSQL shared by every serve and worker on every host (psycopg 3).

Times come from the database's clock (`clock_timestamp()`), never a host's, so a host whose clock
is wrong can neither steal a lease nor keep one. A connection that breaks (the server restarted,
the network went away) is opened again with a growing wait, logged once when it goes and once
when it is back; a transaction body that was cut off is run again on the new connection, which
is why every body in State is safe to repeat. Unique-key races between concurrent claimers and
serialisation failures are run again too.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
from psycopg import errors as pg_errors

from node.state import schema
from node.state.database import Params, T
from node.state.errors import StateError, StateFull

log = logging.getLogger(__name__)

_NOW = "SELECT extract(epoch FROM clock_timestamp())::float8"
_MIGRATION_LOCK = 7_341_150  # pg_advisory_xact_lock key: one process migrates at a time
_RACES = (pg_errors.UniqueViolation, pg_errors.SerializationFailure, pg_errors.DeadlockDetected)
_MAX_RACE_RETRIES = 5
_MAX_BACKOFF_S = 10.0
_LITERAL = re.compile(r"('(?:[^']|'')*')")
_NAMED = re.compile(r"(?<!:):([A-Za-z_]\w*)")


class _Transaction:
    def __init__(self, cursor: psycopg.ClientCursor, now: float) -> None:
        self._cursor, self.now = cursor, now

    def execute(self, sql: str, params: Params = ()) -> psycopg.ClientCursor:
        return self._cursor.execute(to_psycopg(sql), params)

    def clock(self) -> float:
        return self._cursor.execute(_NOW).fetchone()[0]

    def executemany(self, sql: str, rows: list[Params]) -> None:
        if rows:
            self._cursor.executemany(to_psycopg(sql), rows)


class PostgresDatabase:
    """One connection per object, shared by the threads of one process under a lock."""

    claim_lock = "FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str, password_file: Path | None = None, connect_timeout_s: float = 5.0) -> None:
        self.description = redact(url)
        self._url = url
        self._password = _read_password(password_file) if password_file is not None else None
        self._connect_timeout_s = connect_timeout_s
        self._lock = threading.RLock()
        self._conn: psycopg.Connection | None = None
        self._down_since: float | None = None
        try:
            self._conn = self._connect()
        except psycopg.OperationalError as exc:
            raise StateError(f"cannot reach the state database {self.description} ({_first_line(exc)}): check "
                             "state.database, that PostgreSQL runs and that this host may connect") from None
        self._migrate()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def now(self) -> float:
        return self.read(_NOW)[0][0]

    def schema_version(self) -> int:
        return self.read("SELECT version FROM schema_version")[0][0]

    def read(self, sql: str, params: Params = ()) -> list[tuple]:
        return self._run(lambda cursor: cursor.execute(to_psycopg(sql), params).fetchall(), transaction=False)

    def write(self, body: Callable[[_Transaction], T]) -> T:
        return self._run(lambda cursor: body(_Transaction(cursor, cursor.execute(_NOW).fetchone()[0])), transaction=True)

    def _run(self, work: Callable[[psycopg.ClientCursor], T], transaction: bool) -> T:
        """`work` on a live connection; run again after a lost connection or a lost race (see the module docstring)."""
        races = 0
        with self._lock:
            while True:
                conn = self._live()
                try:
                    if not transaction:
                        return work(conn.cursor())
                    with conn.transaction():
                        return work(conn.cursor())
                except _RACES:
                    races += 1
                    if races >= _MAX_RACE_RETRIES:
                        raise
                except pg_errors.DiskFull as exc:
                    raise StateFull(f"state database {self.description}: the server's disk is full: free space "
                                    "there (the node carries on by itself once there is room)") from exc
                except psycopg.OperationalError as exc:
                    if not conn.broken and not conn.closed:
                        raise
                    self._lost(exc)

    def _live(self) -> psycopg.Connection:
        """The connection, opened again (waiting as long as it takes) when it is gone."""
        wait = 0.25
        while self._conn is None:
            try:
                self._conn = self._connect()
            except psycopg.OperationalError as exc:
                self._lost(exc)
                time.sleep(wait)
                wait = min(wait * 2, _MAX_BACKOFF_S)
        if self._down_since is not None:
            log.warning("event=state_database_back database=%s down_s=%.1f", self.description,
                        time.monotonic() - self._down_since)
            self._down_since = None
        return self._conn

    def _lost(self, exc: Exception) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.error("event=state_database_unreachable database=%s reason=%r action=\"retrying with a growing wait; "
                      "received images stay in the spool\"", self.description, _first_line(exc))

    def _connect(self) -> psycopg.Connection:
        extra = {"password": self._password} if self._password is not None else {}
        return psycopg.connect(self._url, autocommit=True, cursor_factory=psycopg.ClientCursor,
                               connect_timeout=max(1, round(self._connect_timeout_s)), application_name="paraspinal-node",
                               keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3,
                               tcp_user_timeout=30000, **extra)

    def _migrate(self) -> None:
        def migrate(tx: _Transaction) -> None:
            tx.execute(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
            tx.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = tx.execute("SELECT version FROM schema_version").fetchone()
            version = row[0] if row else schema.FIRST_POSTGRESQL_VERSION - 1
            if version > schema.SCHEMA_VERSION:
                raise StateError(f"state database {self.description} has schema version {version}, newer than "
                                 f"this paraspinal-node knows ({schema.SCHEMA_VERSION}): upgrade paraspinal-node "
                                 "on every host")
            for number in range(version, schema.SCHEMA_VERSION):
                for statement in schema.statements(schema.POSTGRESQL[number - schema.FIRST_POSTGRESQL_VERSION + 1]):
                    tx.execute(statement)
            if row is None:
                tx.execute("INSERT INTO schema_version (version) VALUES (?)", (schema.SCHEMA_VERSION,))
            else:
                tx.execute("UPDATE schema_version SET version = ?", (schema.SCHEMA_VERSION,))

        self.write(migrate)


@lru_cache(maxsize=512)
def to_psycopg(sql: str) -> str:
    """The store's SQL (`?` and `:name` parameters) in psycopg's format, string literals left alone."""
    parts = _LITERAL.split(sql)
    for i in range(0, len(parts), 2):  # even parts are outside quotes
        parts[i] = _NAMED.sub(r"%(\1)s", parts[i].replace("%", "%%").replace("?", "%s"))
    return "".join(parts)


def redact(url: str) -> str:
    """The database URL without its password, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


def _read_password(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise StateError(f"state.password_file {path}: {exc.strerror or exc}: create it, readable by the service "
                         "user only") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
