"""Durable node state in SQLite (WAL): series, jobs and deliveries.

Several processes share the database (the service and its workers), so every write is one
short `BEGIN IMMEDIATE` transaction and every state change that must happen together (a job
finishing and its deliveries appearing) happens in the same one.

`JobStore` is the whole of what a worker process needs: claim, lease, finish and report. Every
worker-side user (the worker, its lease keeper, the supervisor that requeues a dead worker's
jobs) is typed against it and nothing else, because that is the boundary the planned PostgreSQL
store for several worker hosts implements. Series, deliveries, retention and the status page
stay on `State` in the `serve` process, on the host that owns the spool.
"""

from __future__ import annotations

import errno
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

STAGE_DELIVER = "deliver"


class StateError(Exception):
    """The state database cannot be used; the message says why and what to do."""


class StateFull(StateError, sqlite3.OperationalError):
    """A write failed because the disk is full: callers log it once and back off (it is still an sqlite3.Error)."""


def disk_full(exc: BaseException) -> bool:
    """Whether an error means the disk (or quota) is full, from SQLite or from a file write."""
    if isinstance(exc, StateFull):
        return True
    if isinstance(exc, sqlite3.OperationalError):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"
    HELD = "held"


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


@dataclass(frozen=True)
class SeriesRecord:
    """What the node knows about a completed series; patient ID and accession feed the worklist."""

    series_uid: str
    study_uid: str
    patient_id: str
    accession: str
    study_date: str
    modality: str
    description: str
    instances: int
    fingerprint: str
    series_dir: str


@dataclass(frozen=True)
class Job:
    id: int
    series_uid: str
    fingerprint: str
    series_dir: str
    status: JobStatus
    attempts: int
    last_error: str | None
    lease_owner: str | None
    lease_expires_at: float | None
    not_before: float
    created_at: float
    updated_at: float
    finished_at: float | None


@dataclass(frozen=True)
class Delivery:
    id: int
    job_id: int
    destination: str
    file: str
    status: DeliveryStatus
    attempts: int
    next_attempt_at: float
    last_error: str | None
    created_at: float
    sent_at: float | None


@dataclass(frozen=True)
class JobRow:
    """A job with the series it is for, as the status page lists it."""

    job: Job
    series: SeriesRecord


@dataclass(frozen=True)
class StageTiming:
    """How long one stage of one attempt took: load, segment, measure, encode (worker) or deliver (one file)."""

    id: int
    job_id: int
    attempt: int
    stage: str
    seconds: float
    recorded_at: float


@dataclass(frozen=True)
class WorkerReport:
    """What a worker process says about itself on each heartbeat."""

    owner: str  # the lease owner name
    host: str
    pid: int
    index: int  # the supervisor's slot: a new pid in the same slot is a restart
    device: str
    engine: str
    weights_missing: tuple[str, ...]
    engine_restarts: int = 0


@dataclass(frozen=True)
class WorkerRecord:
    report: WorkerReport
    started_at: float
    heartbeat_at: float


@dataclass(frozen=True)
class DestinationTotals:
    """Per destination: deliveries by status, and attempts and failed attempts ever made (never reset by retry)."""

    destination: str
    pending: int
    sent: int
    failed: int
    attempts: int
    failed_attempts: int


@dataclass(frozen=True)
class NewDelivery:
    """One file for one destination ("AE@host:port", or "folder" for the results folder)."""

    destination: str
    file: str


class JobStore(Protocol):
    """The job queue as worker processes use it (see the module docstring)."""

    def claim(self, owner: str, lease_s: float, max_attempts: int) -> Job | None: ...

    def renew(self, job_id: int, owner: str, lease_s: float) -> bool: ...

    def complete(self, job_id: int, owner: str, result: dict[str, Any], deliveries: list[NewDelivery]) -> bool: ...

    def fail(self, job_id: int, owner: str, error: str, retry_at: float | None) -> bool: ...

    def hold(self, job_id: int, owner: str, reason: str) -> bool: ...

    def release(self, job_id: int, owner: str) -> bool: ...

    def release_held(self) -> int: ...

    def requeue_owner(self, owner: str) -> int: ...

    def get_job(self, job_id: int) -> Job | None: ...

    def record_stage_timings(self, job_id: int, attempt: int, seconds: dict[str, float]) -> None: ...

    def report_worker(self, report: WorkerReport) -> None: ...


_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE series (
        series_uid TEXT PRIMARY KEY,
        study_uid TEXT NOT NULL,
        patient_id TEXT NOT NULL,
        accession TEXT NOT NULL,
        study_date TEXT NOT NULL,
        modality TEXT NOT NULL,
        description TEXT NOT NULL,
        instances INTEGER NOT NULL,
        fingerprint TEXT NOT NULL,
        series_dir TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        series_uid TEXT NOT NULL REFERENCES series(series_uid),
        fingerprint TEXT NOT NULL,
        series_dir TEXT NOT NULL,
        status TEXT NOT NULL
            CHECK (status IN ('queued', 'running', 'done', 'failed', 'skipped', 'held')),
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        lease_owner TEXT,
        lease_expires_at REAL,
        not_before REAL NOT NULL DEFAULT 0,
        result TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        finished_at REAL,
        UNIQUE (series_uid, fingerprint)
    );
    CREATE INDEX jobs_by_status ON jobs (status, not_before);
    CREATE TABLE deliveries (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        destination TEXT NOT NULL,
        file TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('pending', 'sent', 'failed')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        last_error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        sent_at REAL,
        UNIQUE (job_id, destination, file)
    );
    CREATE INDEX deliveries_due ON deliveries (status, next_attempt_at);
    """,
    """
    ALTER TABLE series ADD COLUMN pruned_at REAL;
    ALTER TABLE jobs ADD COLUMN outbox_pruned_at REAL;
    """,
    """
    CREATE TABLE stage_timings (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        attempt INTEGER NOT NULL,
        stage TEXT NOT NULL,
        seconds REAL NOT NULL,
        recorded_at REAL NOT NULL
    );
    CREATE INDEX stage_timings_by_job ON stage_timings (job_id);
    CREATE TABLE workers (
        owner TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        slot INTEGER NOT NULL,
        pid INTEGER NOT NULL,
        device TEXT NOT NULL,
        engine TEXT NOT NULL,
        weights_missing TEXT NOT NULL,
        engine_restarts INTEGER NOT NULL DEFAULT 0,
        started_at REAL NOT NULL,
        heartbeat_at REAL NOT NULL
    );
    CREATE TABLE probe (id INTEGER PRIMARY KEY CHECK (id = 1), at REAL NOT NULL);
    ALTER TABLE deliveries ADD COLUMN attempts_total INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE deliveries ADD COLUMN failures_total INTEGER NOT NULL DEFAULT 0;
    UPDATE deliveries SET attempts_total = attempts, failures_total = attempts - (status = 'sent');
    """,
)

# A series whose images can go: every job settled before the cutoff, no delivery pending.
_SETTLED_SERIES = """series.pruned_at IS NULL AND series.updated_at < :cutoff
    AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.series_uid = series.series_uid
        AND (jobs.status NOT IN ('done', 'failed', 'skipped') OR jobs.finished_at IS NULL
             OR jobs.finished_at >= :cutoff))
    AND NOT EXISTS (SELECT 1 FROM deliveries JOIN jobs ON jobs.id = deliveries.job_id
        WHERE jobs.series_uid = series.series_uid AND deliveries.status = 'pending')"""
# A job whose outbox can go: settled before the cutoff, no delivery pending.
_SETTLED_OUTBOX = """jobs.outbox_pruned_at IS NULL AND jobs.status IN ('done', 'failed', 'skipped')
    AND jobs.finished_at < :cutoff
    AND NOT EXISTS (SELECT 1 FROM deliveries WHERE deliveries.job_id = jobs.id AND deliveries.status = 'pending')"""
SCHEMA_VERSION = len(_MIGRATIONS)

_JOB_COLUMNS = ("id, series_uid, fingerprint, series_dir, status, attempts, last_error, lease_owner, "
                "lease_expires_at, not_before, created_at, updated_at, finished_at")
_DELIVERY_COLUMNS = ("id, job_id, destination, file, status, attempts, next_attempt_at, last_error, "
                     "created_at, sent_at")
_SERIES_COLUMNS = ("s.series_uid, s.study_uid, s.patient_id, s.accession, s.study_date, s.modality, s.description, "
                   "s.instances, s.fingerprint, s.series_dir")
_TIMING_COLUMNS = "id, job_id, attempt, stage, seconds, recorded_at"


def open_state(database: Path, create: bool = True) -> State:
    """Open (migrating as needed) the state database at `database`; only `serve` creates a missing one
    (`create`), so that a `status` before the first start cannot pass off a fresh database as the node's."""
    if not create and not (database.exists() and database.stat().st_size > 0):
        raise StateError(f"no state database at {database}: start `paraspinal-node serve` first, or check "
                         "storage.state_dir")
    database.parent.mkdir(parents=True, exist_ok=True)
    return State(database)


class State:
    """The SQLite implementation of JobStore, plus the series and delivery tables.

    One connection per object, shared by the threads of one process under a lock.
    """

    def __init__(self, database: Path, clock=time.time) -> None:
        self._clock = clock
        self._database = database
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(database, timeout=30.0, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as exc:
            raise StateError(f"cannot open state database {database} ({exc}): check storage.state_dir "
                             "exists and is writable by the service user") from None
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate(database)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _migrate(self, database: Path) -> None:
        with self._transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StateError(f"state database {database} has schema version {version}, newer than this "
                                 f"paraspinal-node knows ({SCHEMA_VERSION}): upgrade paraspinal-node")
            for number in range(version, SCHEMA_VERSION):
                for statement in _statements(_MIGRATIONS[number]):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version={number + 1}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """An immediate write transaction, so concurrent claimers serialise instead of deadlocking.

        A COMMIT that fails (a full disk) is rolled back too, so the connection stays usable, and a
        full disk is raised as StateFull with one line naming the fix.
        """
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as exc:
                if disk_full(exc) and not isinstance(exc, StateFull):
                    raise StateFull(f"state database {self._database}: the disk is full: free space on its "
                                    "filesystem (the node carries on by itself once there is room)") from exc
                raise

    def _query(self, sql: str, params: tuple | dict = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    @property
    def schema_version(self) -> int:
        return self._query("PRAGMA user_version")[0][0]

    # series -------------------------------------------------------------------------------

    def record_series(self, series: SeriesRecord) -> None:
        """Insert or refresh a completed series; the latest content wins."""
        values = {**series.__dict__, "now": self._clock()}
        with self._transaction() as db:
            db.execute(
                """INSERT INTO series (series_uid, study_uid, patient_id, accession, study_date, modality,
                   description, instances, fingerprint, series_dir, updated_at)
                   VALUES (:series_uid, :study_uid, :patient_id, :accession, :study_date,
                   :modality, :description, :instances, :fingerprint, :series_dir, :now)
                   ON CONFLICT (series_uid) DO UPDATE SET study_uid=excluded.study_uid,
                   patient_id=excluded.patient_id, accession=excluded.accession, study_date=excluded.study_date,
                   modality=excluded.modality, description=excluded.description, instances=excluded.instances,
                   fingerprint=excluded.fingerprint, series_dir=excluded.series_dir, updated_at=excluded.updated_at,
                   pruned_at=NULL""",
                values,
            )

    def get_series(self, series_uid: str) -> SeriesRecord | None:
        rows = self._query(
            "SELECT series_uid, study_uid, patient_id, accession, study_date, modality, description, instances, "
            "fingerprint, series_dir FROM series WHERE series_uid = ?", (series_uid,))
        return SeriesRecord(*rows[0]) if rows else None

    def has_job_for(self, series_uid: str, fingerprint: str) -> bool:
        """Whether this exact series content was already queued or skipped."""
        return bool(self._query("SELECT 1 FROM jobs WHERE series_uid = ? AND fingerprint = ?",
                                (series_uid, fingerprint)))

    # jobs ---------------------------------------------------------------------------------

    def add_job(self, series_uid: str, fingerprint: str, series_dir: str,
                status: JobStatus = JobStatus.QUEUED, reason: str | None = None) -> Job | None:
        """Queue (or record as skipped) one series content; None when that content already has a job."""
        now = self._clock()
        finished = now if status in (JobStatus.SKIPPED, JobStatus.DONE, JobStatus.FAILED) else None
        with self._transaction() as db:
            cursor = db.execute(
                """INSERT INTO jobs (series_uid, fingerprint, series_dir, status, last_error, created_at,
                   updated_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (series_uid, fingerprint) DO NOTHING""",
                (series_uid, fingerprint, series_dir, str(status), reason, now, now, finished),
            )
            if cursor.rowcount == 0:
                return None
            return _job(db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (cursor.lastrowid,)).fetchone())

    def claim(self, owner: str, lease_s: float, max_attempts: int) -> Job | None:
        """Take the oldest runnable job for `owner`, first settling leases whose worker died."""
        now = self._clock()
        with self._transaction() as db:
            self._settle_expired_leases(db, now, max_attempts)
            row = db.execute(
                "SELECT id FROM jobs WHERE status = 'queued' AND not_before <= ? ORDER BY not_before, id LIMIT 1",
                (now,)).fetchone()
            if row is None:
                return None
            db.execute(
                """UPDATE jobs SET status = 'running', attempts = attempts + 1, lease_owner = ?,
                   lease_expires_at = ?, updated_at = ? WHERE id = ?""",
                (owner, now + lease_s, now, row[0]))
            return _job(db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (row[0],)).fetchone())

    def _settle_expired_leases(self, db: sqlite3.Connection, now: float, max_attempts: int) -> None:
        db.execute(
            """UPDATE jobs SET status = 'failed', finished_at = :now, updated_at = :now, lease_owner = NULL,
               last_error = 'worker stopped during the job ' || attempts || ' times (lease expired); last error: '
                            || COALESCE(last_error, 'none')
               WHERE status = 'running' AND lease_expires_at < :now AND attempts >= :max""",
            {"now": now, "max": max_attempts})
        db.execute(
            """UPDATE jobs SET status = 'queued', updated_at = :now, lease_owner = NULL, lease_expires_at = NULL
               WHERE status = 'running' AND lease_expires_at < :now""", {"now": now})

    def renew(self, job_id: int, owner: str, lease_s: float) -> bool:
        """Extend the lease; False means the lease was lost and the worker must drop the job."""
        now = self._clock()
        with self._transaction() as db:
            cursor = db.execute(
                """UPDATE jobs SET lease_expires_at = ?, updated_at = ?
                   WHERE id = ? AND lease_owner = ? AND status = 'running'""", (now + lease_s, now, job_id, owner))
            return cursor.rowcount == 1

    def complete(self, job_id: int, owner: str, result: dict[str, Any], deliveries: list[NewDelivery]) -> bool:
        """Mark the job done and queue its deliveries in one transaction, only while `owner` holds it."""
        now = self._clock()
        with self._transaction() as db:
            cursor = db.execute(
                """UPDATE jobs SET status = 'done', result = ?, last_error = NULL, lease_owner = NULL,
                   lease_expires_at = NULL, finished_at = ?, updated_at = ?
                   WHERE id = ? AND lease_owner = ? AND status = 'running'""",
                (json.dumps(result), now, now, job_id, owner))
            if cursor.rowcount != 1:
                return False
            db.executemany(
                """INSERT INTO deliveries (job_id, destination, file, status, next_attempt_at, created_at, updated_at)
                   VALUES (?, ?, ?, 'pending', ?, ?, ?) ON CONFLICT (job_id, destination, file) DO NOTHING""",
                [(job_id, d.destination, d.file, now, now, now) for d in deliveries])
            return True

    def fail(self, job_id: int, owner: str, error: str, retry_at: float | None) -> bool:
        """Record a failed attempt: queued again at `retry_at`, or failed for good when it is None."""
        now = self._clock()
        status, finished = ("queued", None) if retry_at is not None else ("failed", now)
        with self._transaction() as db:
            cursor = db.execute(
                """UPDATE jobs SET status = ?, last_error = ?, not_before = ?, finished_at = ?, lease_owner = NULL,
                   lease_expires_at = NULL, updated_at = ? WHERE id = ? AND lease_owner = ? AND status = 'running'""",
                (status, error, retry_at or 0, finished, now, job_id, owner))
            return cursor.rowcount == 1

    def hold(self, job_id: int, owner: str, reason: str) -> bool:
        """Park a job that cannot run yet (missing weights); the attempt does not count."""
        now = self._clock()
        with self._transaction() as db:
            cursor = db.execute(
                """UPDATE jobs SET status = 'held', last_error = ?, attempts = MAX(attempts - 1, 0),
                   lease_owner = NULL, lease_expires_at = NULL, updated_at = ?
                   WHERE id = ? AND lease_owner = ? AND status = 'running'""", (reason, now, job_id, owner))
            return cursor.rowcount == 1

    def release(self, job_id: int, owner: str) -> bool:
        """Hand a job back unfinished (the worker is stopping); the attempt does not count."""
        now = self._clock()
        with self._transaction() as db:
            cursor = db.execute(
                """UPDATE jobs SET status = 'queued', attempts = MAX(attempts - 1, 0), lease_owner = NULL,
                   lease_expires_at = NULL, updated_at = ? WHERE id = ? AND lease_owner = ? AND status = 'running'""",
                (now, job_id, owner))
            return cursor.rowcount == 1

    def release_held(self) -> int:
        """Queue every held job again; returns how many."""
        now = self._clock()
        with self._transaction() as db:
            return db.execute("UPDATE jobs SET status = 'queued', not_before = 0, updated_at = ? "
                              "WHERE status = 'held'", (now,)).rowcount

    def requeue_owner(self, owner: str) -> int:
        """Give back the jobs of a worker known to be dead, without waiting for its lease to expire."""
        now = self._clock()
        with self._transaction() as db:
            return db.execute("UPDATE jobs SET lease_expires_at = ? WHERE status = 'running' AND lease_owner = ?",
                              (now - 1, owner)).rowcount

    def retry(self, job_id: int) -> str:
        """Operator retry: queue a failed, held or skipped job again, or resend failed deliveries."""
        now = self._clock()
        with self._transaction() as db:
            row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise StateError(f"no job {job_id}: see `paraspinal-node status` for job numbers")
            pruned_series, pruned_outbox = db.execute(
                """SELECT series.pruned_at, jobs.outbox_pruned_at FROM jobs JOIN series USING (series_uid)
                   WHERE jobs.id = ?""", (job_id,)).fetchone()
            if row[0] in ("failed", "held", "skipped"):
                if pruned_series is not None:
                    raise StateError(f"job {job_id}: its images were removed from the spool after "
                                     "storage.retention_days: send the series to the node again")
                db.execute("""UPDATE jobs SET status = 'queued', attempts = 0, not_before = 0, finished_at = NULL,
                              updated_at = ? WHERE id = ?""", (now, job_id))
                return f"job {job_id} queued again"
            if pruned_outbox is not None:
                raise StateError(f"job {job_id}: its results were removed from the outbox after "
                                 "storage.retention_days: send the series to the node again")
            resent = db.execute(
                """UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = ?, created_at = ?,
                   updated_at = ? WHERE job_id = ? AND status = 'failed'""", (now, now, now, job_id)).rowcount
            if resent:
                return f"job {job_id}: {resent} failed deliveries pending again"
            raise StateError(f"job {job_id} is {row[0]} with no failed deliveries: there is nothing to retry")

    # retention ------------------------------------------------------------------------------

    def prunable_series(self, cutoff: float, limit: int) -> list[tuple[str, str]]:
        """(series UID, spool folder) of series settled before `cutoff` and not yet pruned."""
        return self._query(f"SELECT series_uid, series_dir FROM series WHERE {_SETTLED_SERIES} LIMIT :limit",
                           {"cutoff": cutoff, "limit": limit})

    def mark_series_pruned(self, series_uid: str, cutoff: float) -> bool:
        """Record that a series' images are going, if it is still settled (a retry may have queued it)."""
        with self._transaction() as db:
            return db.execute(f"UPDATE series SET pruned_at = :now WHERE series_uid = :uid AND {_SETTLED_SERIES}",
                              {"now": self._clock(), "uid": series_uid, "cutoff": cutoff}).rowcount == 1

    def prunable_outboxes(self, cutoff: float, limit: int) -> list[int]:
        """Jobs settled before `cutoff` whose outbox folder has not been pruned."""
        rows = self._query(f"SELECT id FROM jobs WHERE {_SETTLED_OUTBOX} LIMIT :limit",
                           {"cutoff": cutoff, "limit": limit})
        return [row[0] for row in rows]

    def mark_outbox_pruned(self, job_id: int, cutoff: float) -> bool:
        """Record that a job's outbox is going, if the job is still settled."""
        with self._transaction() as db:
            return db.execute(f"UPDATE jobs SET outbox_pruned_at = :now WHERE id = :id AND {_SETTLED_OUTBOX}",
                              {"now": self._clock(), "id": job_id, "cutoff": cutoff}).rowcount == 1

    def get_job(self, job_id: int) -> Job | None:
        rows = self._query(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def jobs(self, limit: int = 50) -> list[Job]:
        return [_job(r) for r in self._query(f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY id DESC LIMIT ?", (limit,))]

    def job_result(self, job_id: int) -> dict[str, Any] | None:
        rows = self._query("SELECT result FROM jobs WHERE id = ?", (job_id,))
        return json.loads(rows[0][0]) if rows and rows[0][0] else None

    def job_counts(self) -> dict[str, int]:
        return dict(self._query("SELECT status, COUNT(*) FROM jobs GROUP BY status"))

    def processed(self, since: str | None) -> list[tuple[SeriesRecord, int, dict[str, Any]]]:
        """The latest done job of each series, with its measurements, oldest study first."""
        rows = self._query(
            """SELECT s.series_uid, s.study_uid, s.patient_id, s.accession, s.study_date, s.modality,
                      s.description, s.instances, s.fingerprint, s.series_dir, j.id, j.result
               FROM jobs j JOIN series s ON s.series_uid = j.series_uid
               WHERE j.status = 'done' AND j.id = (SELECT MAX(id) FROM jobs k
                                                    WHERE k.series_uid = j.series_uid AND k.status = 'done')
                 AND (:since IS NULL OR s.study_date >= :since)
               ORDER BY s.study_date, j.id""", {"since": since})
        return [(SeriesRecord(*r[:10]), r[10], json.loads(r[11])) for r in rows]

    # deliveries ---------------------------------------------------------------------------

    def due_deliveries(self, limit: int = 100, max_wait_s: float | None = None) -> list[Delivery]:
        """Pending deliveries whose time has come; also those scheduled more than `max_wait_s` ahead,
        which no backoff can schedule: the wall clock was set back, and they must not wait for it."""
        now = self._clock()
        ahead = now + max_wait_s if max_wait_s is not None else float("inf")
        rows = self._query(
            f"""SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE status = 'pending'
                AND (next_attempt_at <= ? OR next_attempt_at > ?) ORDER BY next_attempt_at, id LIMIT ?""",
            (now, ahead, limit))
        return [_delivery(r) for r in rows]

    def mark_sent(self, delivery_id: int) -> None:
        now = self._clock()
        with self._transaction() as db:
            sent = db.execute("""UPDATE deliveries SET status = 'sent', attempts = attempts + 1, last_error = NULL,
                                 attempts_total = attempts_total + 1, sent_at = ?, updated_at = ?
                                 WHERE id = ? AND status = 'pending'""", (now, now, delivery_id)).rowcount
            if sent:  # the deliver stage: from results queued (or retried) to the destination's acknowledgement
                db.execute(f"""INSERT INTO stage_timings (job_id, attempt, stage, seconds, recorded_at)
                               SELECT job_id, attempts, '{STAGE_DELIVER}', ? - created_at, ? FROM deliveries
                               WHERE id = ?""", (now, now, delivery_id))

    def mark_not_sent(self, delivery_id: int, error: str, next_attempt_at: float | None) -> None:
        """Record a failed attempt: pending again at `next_attempt_at`, or failed for good when None."""
        now = self._clock()
        status = "pending" if next_attempt_at is not None else "failed"
        with self._transaction() as db:
            db.execute("""UPDATE deliveries SET status = ?, attempts = attempts + 1, last_error = ?,
                          attempts_total = attempts_total + 1, failures_total = failures_total + 1,
                          next_attempt_at = ?, updated_at = ? WHERE id = ? AND status = 'pending'""",
                       (status, error, next_attempt_at if next_attempt_at is not None else now, now, delivery_id))

    def deliveries(self, job_id: int | None = None) -> list[Delivery]:
        sql = f"SELECT {_DELIVERY_COLUMNS} FROM deliveries"
        rows = self._query(sql + " WHERE job_id = ? ORDER BY id", (job_id,)) if job_id is not None \
            else self._query(sql + " ORDER BY id")
        return [_delivery(r) for r in rows]

    def delivery_counts(self) -> dict[str, int]:
        return dict(self._query("SELECT status, COUNT(*) FROM deliveries GROUP BY status"))

    def recent_errors(self, limit: int = 10) -> list[tuple[str, int, str]]:
        """(kind, id, error) of the latest job and delivery errors, newest first."""
        rows = self._query(
            """SELECT kind, id, last_error FROM (
                   SELECT 'job' AS kind, id, last_error, updated_at FROM jobs WHERE last_error IS NOT NULL
                   UNION ALL
                   SELECT 'delivery', id, last_error, updated_at FROM deliveries WHERE last_error IS NOT NULL)
               ORDER BY updated_at DESC LIMIT ?""", (limit,))
        return [(r[0], r[1], r[2]) for r in rows]


    # status page and metrics --------------------------------------------------------------------

    def job_rows(self, status: JobStatus | None = None, search: str = "", offset: int = 0,
                 limit: int = 50) -> tuple[list[JobRow], int]:
        """One page of jobs, newest first, with their series; and how many match in all.

        `search` matches part of the series UID, patient ID, accession or series description.
        """
        where = """WHERE (:status IS NULL OR j.status = :status) AND (:search = '' OR instr(s.series_uid, :search)
                   OR instr(s.patient_id, :search) OR instr(s.accession, :search)
                   OR instr(lower(s.description), lower(:search)))"""
        params = {"status": None if status is None else str(status), "search": search, "offset": offset,
                  "limit": limit}
        columns = ", ".join(f"j.{c.strip()}" for c in _JOB_COLUMNS.split(","))
        rows = self._query(f"""SELECT {columns}, {_SERIES_COLUMNS} FROM jobs j JOIN series s USING (series_uid)
                               {where} ORDER BY j.id DESC LIMIT :limit OFFSET :offset""", params)
        total = self._query(f"SELECT COUNT(*) FROM jobs j JOIN series s USING (series_uid) {where}", params)[0][0]
        width = len(_JOB_COLUMNS.split(","))
        return [JobRow(_job(r[:width]), SeriesRecord(*r[width:])) for r in rows], total

    def record_stage_timings(self, job_id: int, attempt: int, seconds: dict[str, float]) -> None:
        """The worker's stage durations of one attempt, in the order they ran."""
        now = self._clock()
        with self._transaction() as db:
            db.executemany("INSERT INTO stage_timings (job_id, attempt, stage, seconds, recorded_at) "
                           "VALUES (?, ?, ?, ?, ?)", [(job_id, attempt, stage, s, now) for stage, s in seconds.items()])

    def stage_timings(self, job_ids: list[int]) -> list[StageTiming]:
        """Every stage timing of these jobs, oldest first."""
        marks = ", ".join("?" * len(job_ids))
        rows = self._query(f"SELECT {_TIMING_COLUMNS} FROM stage_timings WHERE job_id IN ({marks}) ORDER BY id",
                           tuple(job_ids)) if job_ids else []
        return [StageTiming(*r) for r in rows]

    def stage_timings_after(self, last_id: int, limit: int = 10000) -> list[StageTiming]:
        """Timings recorded after the one numbered `last_id`, so a reader can keep running totals."""
        rows = self._query(f"SELECT {_TIMING_COLUMNS} FROM stage_timings WHERE id > ? ORDER BY id LIMIT ?",
                           (last_id, limit))
        return [StageTiming(*r) for r in rows]

    def skip_reasons(self) -> list[tuple[str, int]]:
        """(reason, skipped jobs) for every distinct reason a series was skipped."""
        return self._query("SELECT last_error, COUNT(*) FROM jobs WHERE status = 'skipped' GROUP BY last_error")

    def oldest_queued_since(self) -> float | None:
        """Since when the longest-waiting runnable job has been waiting (a retry's delay not counted)."""
        return self._query("SELECT MIN(MAX(updated_at, not_before)) FROM jobs WHERE status = 'queued'")[0][0]

    def destination_totals(self) -> list[DestinationTotals]:
        rows = self._query(
            """SELECT destination, SUM(status = 'pending'), SUM(status = 'sent'), SUM(status = 'failed'),
                      SUM(attempts_total), SUM(failures_total) FROM deliveries GROUP BY destination ORDER BY destination""")
        return [DestinationTotals(*r) for r in rows]

    def report_worker(self, report: WorkerReport) -> None:
        """A worker's heartbeat: who it is, its device and engine, and which weights it misses."""
        now = self._clock()
        with self._transaction() as db:
            db.execute(
                """INSERT INTO workers (owner, host, slot, pid, device, engine, weights_missing, engine_restarts,
                   started_at, heartbeat_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (owner) DO UPDATE SET device = excluded.device, engine = excluded.engine,
                   weights_missing = excluded.weights_missing, engine_restarts = excluded.engine_restarts,
                   heartbeat_at = excluded.heartbeat_at""",
                (report.owner, report.host, report.index, report.pid, report.device, report.engine,
                 json.dumps(list(report.weights_missing)), report.engine_restarts, now, now))

    def workers(self) -> list[WorkerRecord]:
        """Every worker process that ever reported, newest start first."""
        rows = self._query("""SELECT owner, host, pid, slot, device, engine, weights_missing, engine_restarts,
                              started_at, heartbeat_at FROM workers ORDER BY started_at DESC""")
        return [WorkerRecord(WorkerReport(*r[:6], tuple(json.loads(r[6])), r[7]), r[8], r[9]) for r in rows]

    def running_owners(self) -> dict[str, int]:
        """Lease owner → job for every job running under a live lease."""
        return dict(self._query("SELECT lease_owner, id FROM jobs WHERE status = 'running' AND lease_expires_at >= ?",
                                (self._clock(),)))

    def check_writable(self) -> None:
        """Raises sqlite3.Error when the database cannot take a write (read-only, disk full, locked too long)."""
        with self._transaction() as db:
            db.execute("INSERT INTO probe (id, at) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET at = excluded.at",
                       (self._clock(),))


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _job(row: tuple) -> Job:
    return Job(row[0], row[1], row[2], row[3], JobStatus(row[4]), *row[5:])


def _delivery(row: tuple) -> Delivery:
    return Delivery(row[0], row[1], row[2], row[3], DeliveryStatus(row[4]), *row[5:])
