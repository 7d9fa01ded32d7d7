"""What the store needs from a database: one write transaction at a time, reads, and its clock.

`State` holds all the SQL, written once in the subset that SQLite and PostgreSQL share (named
`:key` or `?` parameters, `greatest`/`strpos`, which the SQLite backend adds as functions). A
backend runs a transaction body as a function, so it can run it again when the connection broke
before the commit was confirmed: every body is written to be safe to repeat.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
Params = Sequence[Any] | dict[str, Any]


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> tuple | None: ...

    def fetchall(self) -> list[tuple]: ...


class Transaction(Protocol):
    """One open write transaction; `now` is the database's clock when it began, in seconds since 1970."""

    now: float

    def execute(self, sql: str, params: Params = ()) -> Cursor: ...

    def executemany(self, sql: str, rows: list[Params]) -> None: ...

    def clock(self) -> float:
        """The database's clock now, later than every commit this transaction's statements have seen."""
        ...


class Database(Protocol):
    """A backend: SQLite (node/state/sqlite.py) or PostgreSQL (node/state/postgres.py)."""

    description: str  # for messages: the file, or the server without its password
    claim_lock: str  # appended to the claim's SELECT: PostgreSQL's "FOR UPDATE SKIP LOCKED"

    def write(self, body: Callable[[Transaction], T]) -> T: ...

    def read(self, sql: str, params: Params = ()) -> list[tuple]: ...

    def now(self) -> float: ...

    def schema_version(self) -> int: ...

    def close(self) -> None: ...
