"""The backfill part of `State`: each backfill's search progress and its candidate series (issue 21).

A backfill searches the PACS day by day: a day's candidates and the move to the next day are one
transaction, so a restart searches again from the first day not recorded. A series is a candidate
of one backfill only (its primary key), so overlapping backfills never retrieve it twice; one that
failed is taken over by a later backfill. A candidate's `status` is what the backfill did:
found (to retrieve, from `not_before`), retrieved (whole in the spool), measured (a job of it was
already done when it was found), failed (after `backfill.max_attempts`). Whether a retrieved series
has been measured since is read from its jobs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from node.state.database import Database, Transaction


class BackfillStatus(StrEnum):
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"


class CandidateStatus(StrEnum):
    FOUND = "found"
    RETRIEVED = "retrieved"
    MEASURED = "measured"  # already measured when found: not retrieved again
    FAILED = "failed"


@dataclass(frozen=True)
class NewBackfill:
    serve: str
    date_from: str  # YYYYMMDD
    date_to: str
    query: dict[str, Any]  # BackfillQueryConfig as a dict, kept as it was at the start
    send_results: bool


@dataclass(frozen=True)
class Backfill:
    id: int
    serve: str
    date_from: str
    date_to: str
    query: dict[str, Any]
    send_results: bool
    next_day: str  # the first day not searched yet; after date_to: the search is over
    status: BackfillStatus
    created_at: float
    finished_at: float | None

    @property
    def searching(self) -> bool:
        return self.next_day <= self.date_to


@dataclass(frozen=True)
class Candidate:
    """A series the backfill chose from the PACS's answers."""

    series_uid: str
    study_uid: str
    study_date: str
    expected: int  # NumberOfSeriesRelatedInstances: fewer received is a partial retrieve


@dataclass(frozen=True)
class CandidateRow:
    backfill_id: int
    candidate: Candidate
    status: CandidateStatus
    attempts: int
    last_error: str | None
    not_before: float


@dataclass(frozen=True)
class BackfillProgress:
    """What the status page shows of one backfill; ETA comes from the last hour's retrieve rate."""

    backfill: Backfill
    found: int
    retrieved: int
    measured: int
    failed: int
    retrieved_last_hour: int

    @property
    def remaining(self) -> int:
        return max(0, self.found - self.measured - self.failed)

    def eta_s(self) -> float | None:
        """Seconds until every candidate is measured or failed at the last hour's pace; None without one."""
        if self.remaining == 0:
            return 0.0
        return self.remaining * 3600.0 / self.retrieved_last_hour if self.retrieved_last_hour else None


_BACKFILL_COLUMNS = ("id, serve, date_from, date_to, query, send_results, next_day, status, created_at, finished_at")
_CANDIDATE_COLUMNS = "backfill_id, series_uid, study_uid, study_date, expected, status, attempts, last_error, not_before"
_MEASURED = "EXISTS (SELECT 1 FROM jobs j WHERE j.series_uid = c.series_uid AND j.status = 'done')"
_JOB_ENDED_WITHOUT_RESULT = ("EXISTS (SELECT 1 FROM jobs j WHERE j.series_uid = c.series_uid "
                             "AND j.status IN ('failed', 'skipped'))")


class BackfillState:
    """Mixed into `State`; all of it runs on `self._db`."""

    _db: Database
    serve: str

    def add_backfill(self, new: NewBackfill) -> int:
        """Record a backfill for `new.serve` to run; its id."""

        def insert(tx: Transaction) -> int:
            return tx.execute(
                """INSERT INTO backfills (serve, date_from, date_to, query, send_results, next_day, status, created_at,
                   updated_at) VALUES (:serve, :date_from, :date_to, :query, :send, :date_from, 'running', :now, :now)
                   RETURNING id""",
                {"serve": new.serve, "date_from": new.date_from, "date_to": new.date_to, "query": json.dumps(new.query),
                 "send": int(new.send_results), "now": tx.now}).fetchone()[0]

        return self._db.write(insert)

    def backfills(self, running_only: bool = False, serve: str | None = None) -> list[Backfill]:
        rows = self._db.read(
            f"""SELECT {_BACKFILL_COLUMNS} FROM backfills WHERE (:running = 0 OR status = 'running')
                AND (:serve = '' OR serve = :serve) ORDER BY id""", {"running": int(running_only), "serve": serve or ""})
        return [_backfill(r) for r in rows]

    def record_backfill_day(self, backfill_id: int, day: str, next_day: str, found: list[Candidate]) -> int:
        """One searched day: its candidates (already measured ones as such) and the next day to search, together.
        Repeating it (a lost answer) adds nothing; returns how many candidates were new."""

        def record(tx: Transaction) -> int:
            added = 0
            for candidate in found:
                params = {**candidate.__dict__, "backfill": backfill_id, "now": tx.now}
                measured = tx.execute("SELECT 1 FROM jobs WHERE series_uid = :series_uid AND status = 'done'",
                                      params).fetchone()
                params["status"] = str(CandidateStatus.MEASURED if measured else CandidateStatus.FOUND)
                added += tx.execute(
                    """INSERT INTO backfill_series (series_uid, backfill_id, study_uid, study_date, expected, status,
                       created_at, updated_at) VALUES (:series_uid, :backfill, :study_uid, :study_date, :expected,
                       :status, :now, :now)
                       ON CONFLICT (series_uid) DO UPDATE SET backfill_id = excluded.backfill_id, status = excluded.status,
                       expected = excluded.expected, attempts = 0, last_error = NULL, not_before = 0,
                       updated_at = excluded.updated_at
                       WHERE backfill_series.status = 'failed' AND backfill_series.backfill_id <> excluded.backfill_id""",
                    params).rowcount
            tx.execute("UPDATE backfills SET next_day = :next, updated_at = :now WHERE id = :id AND next_day = :day",
                       {"next": next_day, "now": tx.now, "id": backfill_id, "day": day})
            return added

        return self._db.write(record)

    def due_candidates(self, backfill_id: int, now: float, limit: int = 8) -> list[CandidateRow]:
        """Found candidates whose retry time has come, oldest study first."""
        rows = self._db.read(
            f"""SELECT {_CANDIDATE_COLUMNS} FROM backfill_series WHERE backfill_id = :id AND status = 'found'
                AND not_before <= :now ORDER BY study_date, study_uid, series_uid LIMIT :limit""",
            {"id": backfill_id, "now": now, "limit": limit})
        return [_candidate(r) for r in rows]

    def candidates(self, backfill_id: int) -> list[CandidateRow]:
        rows = self._db.read(f"SELECT {_CANDIDATE_COLUMNS} FROM backfill_series WHERE backfill_id = ? "
                             "ORDER BY study_date, study_uid, series_uid", (backfill_id,))
        return [_candidate(r) for r in rows]

    def start_retrieve(self, series_uid: str, at: float) -> None:
        """A retrieve of the series begins at `at` (the backfill's clock): it counts against studies_per_hour."""
        self._db.write(lambda tx: tx.execute(
            """UPDATE backfill_series SET attempts = attempts + 1, last_attempt_at = :at, updated_at = :now
               WHERE series_uid = :uid AND status = 'found'
               AND (last_attempt_at IS NULL OR last_attempt_at <> :at)""", {"at": at, "now": tx.now, "uid": series_uid}))

    def retrieved(self, series_uid: str, at: float) -> None:
        self._db.write(lambda tx: tx.execute(
            """UPDATE backfill_series SET status = 'retrieved', retrieved_at = :at, last_error = NULL, updated_at = :now
               WHERE series_uid = :uid AND status = 'found'""", {"at": at, "now": tx.now, "uid": series_uid}))

    def retrieve_failed(self, series_uid: str, error: str, retry_at: float | None) -> None:
        """Found again from `retry_at`, or failed for good when None."""
        status = CandidateStatus.FOUND if retry_at is not None else CandidateStatus.FAILED
        self._db.write(lambda tx: tx.execute(
            """UPDATE backfill_series SET status = :status, last_error = :error, not_before = :retry, updated_at = :now
               WHERE series_uid = :uid AND status = 'found'""",
            {"status": str(status), "error": error, "retry": retry_at or 0.0, "now": tx.now, "uid": series_uid}))

    def studies_retrieved_since(self, since: float) -> set[str]:
        """Study UIDs whose retrieve began at or after `since` (the backfill clock), any backfill of this serve."""
        rows = self._db.read(
            """SELECT DISTINCT c.study_uid FROM backfill_series c JOIN backfills b ON b.id = c.backfill_id
               WHERE c.last_attempt_at >= :since AND b.serve = :serve""", {"since": since, "serve": self.serve})
        return {r[0] for r in rows}

    def live_queue(self) -> int:
        """Jobs queued or running: the backfill waits while there are too many."""
        return int(self._db.read("SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running')")[0][0])

    def backfill_expected(self, series_uid: str) -> int | None:
        """The instance count the PACS listed for a backfilled series still being retrieved; None otherwise."""
        rows = self._db.read("SELECT expected FROM backfill_series WHERE series_uid = ? AND status IN ('found', 'retrieved')",
                             (series_uid,))
        return int(rows[0][0]) if rows else None

    def results_withheld(self, series_uid: str) -> bool:
        """A series backfilled with send_results off: its results go to the worklist and results folder only."""
        return bool(self._db.read(
            """SELECT 1 FROM backfill_series c JOIN backfills b ON b.id = c.backfill_id
               WHERE c.series_uid = ? AND b.send_results = 0""", (series_uid,)))

    def finish_backfill(self, backfill_id: int) -> bool:
        """Done once the search is over and no candidate waits to be retrieved; True when it ended now."""
        return self._db.write(lambda tx: tx.execute(
            """UPDATE backfills SET status = 'done', finished_at = :now, updated_at = :now
               WHERE id = :id AND status = 'running' AND next_day > date_to
               AND NOT EXISTS (SELECT 1 FROM backfill_series WHERE backfill_id = :id AND status = 'found')""",
            {"id": backfill_id, "now": tx.now}).rowcount == 1)

    def cancel_backfill(self, backfill_id: int) -> bool:
        return self._db.write(lambda tx: tx.execute(
            """UPDATE backfills SET status = 'cancelled', finished_at = :now, updated_at = :now
               WHERE id = :id AND status = 'running'""", {"id": backfill_id, "now": tx.now}).rowcount == 1)

    def backfill_progress(self, since: float) -> list[BackfillProgress]:
        """Every backfill with its counts; `since` (now less an hour) paces the ETA."""
        rows = self._db.read(
            f"""SELECT b.id, COUNT(c.series_uid),
                   COALESCE(SUM(CASE WHEN c.status IN ('retrieved', 'measured') THEN 1 ELSE 0 END), 0),
                   COALESCE(SUM(CASE WHEN c.status = 'measured' OR {_MEASURED} THEN 1 ELSE 0 END), 0),
                   COALESCE(SUM(CASE WHEN c.status = 'failed' OR (c.status = 'retrieved' AND NOT {_MEASURED}
                                     AND {_JOB_ENDED_WITHOUT_RESULT}) THEN 1 ELSE 0 END), 0),
                   COALESCE(SUM(CASE WHEN c.retrieved_at >= :since THEN 1 ELSE 0 END), 0)
                FROM backfills b LEFT JOIN backfill_series c ON c.backfill_id = b.id GROUP BY b.id ORDER BY b.id""",
            {"since": since})
        by_id = {b.id: b for b in self.backfills()}
        return [BackfillProgress(by_id[r[0]], *(int(v) for v in r[1:])) for r in rows if r[0] in by_id]


def _backfill(row: tuple) -> Backfill:
    return Backfill(row[0], row[1], row[2], row[3], json.loads(row[4]), bool(row[5]), row[6], BackfillStatus(row[7]),
                    row[8], row[9])


def _candidate(row: tuple) -> CandidateRow:
    return CandidateRow(row[0], Candidate(row[1], row[2], row[3], int(row[4])), CandidateStatus(row[5]), row[6], row[7],
                        row[8])
