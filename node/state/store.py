"""Durable node state: series, jobs, deliveries, workers and serves, behind one interface.

Two backends hold it (node/state/database.py): SQLite in `storage.state_dir`, the single-host
default, and PostgreSQL (`state.database = "postgresql://..."`) when several serves and worker
hosts share one state. All SQL lives in this package, written once for both. Every state change
that must happen together (a job finishing and its deliveries appearing) is one transaction.

Jobs are claimed under a lease timed by the database's clock, and every claim issues a new
fencing token: renew, complete, fail, hold and release succeed only with the current token and
before the lease has expired, so a worker that lost its lease (paused, partitioned, slow) can
never complete its job, record deliveries or overwrite a newer attempt. The database allows at
most one running job per series, and keeps a record of every run (`runs`) to prove it.

`JobStore` is the whole of what a worker process needs; series, deliveries, retention and the
status page stay on `State` for `serve`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from node.state.backfill import BackfillState
from node.state.database import Database, Transaction
from node.state.errors import StateError, StateFull, disk_full
from node.state.schema import SCHEMA_VERSION
from node.state.sqlite import SqliteDatabase

if TYPE_CHECKING:
    from node.config import Config

__all__ = ["SCHEMA_VERSION", "StateError", "StateFull", "disk_full"]

STAGE_DELIVER = "deliver"


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


class RunOutcome(StrEnum):
    """How one claim of a job ended, as `runs` records it."""

    DONE = "done"
    FAILED = "failed"  # retried later or failed for good: the job says which
    HELD = "held"
    RELEASED = "released"  # handed back by a stopping worker
    LEASE_EXPIRED = "lease_expired"  # its worker stopped renewing: the run ended when the lease did


@dataclass(frozen=True)
class SeriesRecord:
    """What the node knows about a completed series; patient ID and accession feed the worklist.

    `serve` names the serve whose spool holds the images (recorded by State from its own name).
    """

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
    serve: str = ""


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
    token: int = 0  # the fencing token of the latest claim (0: never claimed)


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
class Lease:
    """A running job's lease as the database holds it: who, which token, until when."""

    job_id: int
    owner: str
    token: int
    expires_at: float


@dataclass(frozen=True)
class Run:
    """One claim of a job, from the claim until its outcome (or its lease's expiry)."""

    job_id: int
    series_uid: str
    token: int
    owner: str
    started_at: float
    ended_at: float | None
    outcome: RunOutcome | None


@dataclass(frozen=True)
class HostThroughput:
    """Jobs a host's workers finished in a window, and how many run there now."""

    host: str
    done: int
    running: int


@dataclass(frozen=True)
class ServeRecord:
    """A serve sharing the state: where its DICOMweb for remote workers is ("" when it has none)."""

    name: str
    host: str
    dicomweb_url: str
    started_at: float = 0.0
    heartbeat_at: float = 0.0


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

    def renew(self, job_id: int, token: int, lease_s: float) -> bool: ...

    def complete(self, job_id: int, token: int, result: dict[str, Any], deliveries: list[NewDelivery]) -> bool: ...

    def fail(self, job_id: int, token: int, error: str, retry_in_s: float | None) -> bool: ...

    def hold(self, job_id: int, token: int, reason: str) -> bool: ...

    def release(self, job_id: int, token: int) -> bool: ...

    def release_held(self) -> int: ...

    def requeue_owner(self, owner: str) -> int: ...

    def get_job(self, job_id: int) -> Job | None: ...

    def get_series(self, series_uid: str) -> SeriesRecord | None: ...

    def get_serve(self, name: str) -> ServeRecord | None: ...

    def study_series(self, study_uid: str) -> list[SeriesRecord]: ...

    def record_stage_timings(self, job_id: int, attempt: int, seconds: dict[str, float]) -> None: ...

    def patient_results(self, patient_id: str, limit: int = 100) -> list[tuple[SeriesRecord, int, dict[str, Any]]]: ...

    def report_worker(self, report: WorkerReport) -> None: ...

    def results_withheld(self, series_uid: str) -> bool: ...


# A series whose images can go: every job settled before the cutoff, no delivery pending.
_SETTLED_SERIES = """series.pruned_at IS NULL AND series.updated_at < :cutoff AND series.serve IN (:serve, '')
    AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.series_uid = series.series_uid
        AND (jobs.status NOT IN ('done', 'failed', 'skipped') OR jobs.finished_at IS NULL
             OR jobs.finished_at >= :cutoff))
    AND NOT EXISTS (SELECT 1 FROM deliveries JOIN jobs ON jobs.id = deliveries.job_id
        WHERE jobs.series_uid = series.series_uid AND deliveries.status = 'pending')"""
# A job whose outbox can go: settled before the cutoff, no delivery pending, its series held by this serve.
_SETTLED_OUTBOX = """jobs.outbox_pruned_at IS NULL AND jobs.status IN ('done', 'failed', 'skipped')
    AND jobs.finished_at < :cutoff
    AND EXISTS (SELECT 1 FROM series WHERE series.series_uid = jobs.series_uid AND series.serve IN (:serve, ''))
    AND NOT EXISTS (SELECT 1 FROM deliveries WHERE deliveries.job_id = jobs.id AND deliveries.status = 'pending')"""
# The running job `id` under token `token` whose lease has not expired.
_HELD = "id = :id AND status = 'running' AND lease_token = :token AND lease_expires_at >= :now"

_JOB_COLUMNS = ("id, series_uid, fingerprint, series_dir, status, attempts, last_error, lease_owner, "
                "lease_expires_at, not_before, created_at, updated_at, finished_at, lease_token")
_DELIVERY_COLUMNS = ("id, job_id, destination, file, status, attempts, next_attempt_at, last_error, "
                     "created_at, sent_at")
_SERIES_COLUMNS = ("s.series_uid, s.study_uid, s.patient_id, s.accession, s.study_date, s.modality, s.description, "
                   "s.instances, s.fingerprint, s.series_dir, s.serve")
_SERIES_WIDTH = len(_SERIES_COLUMNS.split(","))
_TIMING_COLUMNS = "id, job_id, attempt, stage, seconds, recorded_at"
_RUN_COLUMNS = "job_id, series_uid, token, owner, started_at, ended_at, outcome"


def open_state(database: Path | str, create: bool = True, serve: str = "", password_file: Path | None = None) -> State:
    """Open (migrating as needed) the state: a PostgreSQL URL, or the SQLite file at `database`.

    Only `serve` creates a missing SQLite file (`create`), so that a `status` before the first start
    cannot pass off a fresh database as the node's. `serve` names the serve this State records
    series for (see SeriesRecord).
    """
    if isinstance(database, str) and database.startswith(("postgresql://", "postgres://")):
        from node.state.postgres import PostgresDatabase  # psycopg only where PostgreSQL is configured

        return State(PostgresDatabase(database, password_file), serve=serve)
    path = Path(database)
    if not create and not (path.exists() and path.stat().st_size > 0):
        raise StateError(f"no state database at {path}: start `paraspinal-node serve` first, or check "
                         "storage.state_dir")
    path.parent.mkdir(parents=True, exist_ok=True)
    return State(path, serve=serve)


def open_configured(config: Config, create: bool = False, serve: str = "") -> State:
    """The state `config` names: [state] database when set, else SQLite in storage.state_dir."""
    location = config.state.database if config.state.shared else config.storage.database
    return open_state(location, create=create, serve=serve, password_file=config.state.password_file)


class State(BackfillState):
    """The node's state on one backend: a Path opens SQLite there (with `clock`, for tests), or pass a Database."""

    def __init__(self, database: Path | Database, clock: Callable[[], float] = time.time, serve: str = "") -> None:
        self._db: Database = SqliteDatabase(database, clock) if isinstance(database, Path) else database
        self.serve = serve

    @property
    def description(self) -> str:
        return self._db.description

    def close(self) -> None:
        self._db.close()

    @property
    def schema_version(self) -> int:
        return self._db.schema_version()

    def now(self) -> float:
        """The database's clock (the host's for SQLite): leases, retries and ages are measured on it."""
        return self._db.now()

    # series -------------------------------------------------------------------------------

    def record_series(self, series: SeriesRecord) -> None:
        """Insert or refresh a completed series, held by this State's serve; the latest content wins."""
        values = {**series.__dict__, "serve": series.serve or self.serve}

        def upsert(tx: Transaction) -> None:
            tx.execute(
                """INSERT INTO series (series_uid, study_uid, patient_id, accession, study_date, modality,
                   description, instances, fingerprint, series_dir, serve, updated_at)
                   VALUES (:series_uid, :study_uid, :patient_id, :accession, :study_date,
                   :modality, :description, :instances, :fingerprint, :series_dir, :serve, :now)
                   ON CONFLICT (series_uid) DO UPDATE SET study_uid=excluded.study_uid,
                   patient_id=excluded.patient_id, accession=excluded.accession, study_date=excluded.study_date,
                   modality=excluded.modality, description=excluded.description, instances=excluded.instances,
                   fingerprint=excluded.fingerprint, series_dir=excluded.series_dir, serve=excluded.serve,
                   updated_at=excluded.updated_at, pruned_at=NULL""",
                {**values, "now": tx.now},
            )

        self._db.write(upsert)

    def get_series(self, series_uid: str) -> SeriesRecord | None:
        rows = self._db.read(f"SELECT {_SERIES_COLUMNS} FROM series s WHERE s.series_uid = ?", (series_uid,))
        return SeriesRecord(*rows[0]) if rows else None

    def study_series(self, study_uid: str) -> list[SeriesRecord]:
        """Every series of a study the node recorded, in series UID order."""
        rows = self._db.read(f"SELECT {_SERIES_COLUMNS} FROM series s WHERE s.study_uid = ? ORDER BY s.series_uid",
                             (study_uid,))
        return [SeriesRecord(*r) for r in rows]

    def has_job_for(self, series_uid: str, fingerprint: str) -> bool:
        """Whether this exact series content was already queued or skipped."""
        return bool(self._db.read("SELECT 1 FROM jobs WHERE series_uid = ? AND fingerprint = ?",
                                  (series_uid, fingerprint)))

    # serves -------------------------------------------------------------------------------

    def register_serve(self, record: ServeRecord) -> None:
        """A serve's start and heartbeat: remote workers find its DICOMweb here."""

        def upsert(tx: Transaction) -> None:
            tx.execute("""INSERT INTO serves (name, host, dicomweb_url, started_at, heartbeat_at)
                          VALUES (:name, :host, :url, :now, :now) ON CONFLICT (name) DO UPDATE SET
                          host = excluded.host, dicomweb_url = excluded.dicomweb_url,
                          heartbeat_at = excluded.heartbeat_at""",
                       {"name": record.name, "host": record.host, "url": record.dicomweb_url, "now": tx.now})

        self._db.write(upsert)

    def get_serve(self, name: str) -> ServeRecord | None:
        rows = self._db.read("SELECT name, host, dicomweb_url, started_at, heartbeat_at FROM serves WHERE name = ?",
                             (name,))
        return ServeRecord(*rows[0]) if rows else None

    def serves(self) -> list[ServeRecord]:
        rows = self._db.read("SELECT name, host, dicomweb_url, started_at, heartbeat_at FROM serves ORDER BY name")
        return [ServeRecord(*r) for r in rows]

    # jobs ---------------------------------------------------------------------------------

    def add_job(self, series_uid: str, fingerprint: str, series_dir: str,
                status: JobStatus = JobStatus.QUEUED, reason: str | None = None) -> Job | None:
        """Queue (or record as skipped) one series content; None when that content already has a job."""

        def insert(tx: Transaction) -> Job | None:
            finished = tx.now if status in (JobStatus.SKIPPED, JobStatus.DONE, JobStatus.FAILED) else None
            row = tx.execute(
                f"""INSERT INTO jobs (series_uid, fingerprint, series_dir, status, last_error, created_at,
                   updated_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (series_uid, fingerprint) DO NOTHING RETURNING {_JOB_COLUMNS}""",
                (series_uid, fingerprint, series_dir, str(status), reason, tx.now, tx.now, finished)).fetchone()
            return None if row is None else _job(row)

        return self._db.write(insert)

    def claim(self, owner: str, lease_s: float, max_attempts: int) -> Job | None:
        """Take the oldest runnable job for `owner` under a new fencing token, first settling leases whose
        worker died. A series with a running job is passed over: one run per series at a time."""

        def take(tx: Transaction) -> Job | None:
            self._settle_expired_leases(tx, max_attempts)
            row = tx.execute(
                f"""SELECT id, series_uid FROM jobs j WHERE status = 'queued' AND not_before <= :now
                    AND NOT EXISTS (SELECT 1 FROM jobs r WHERE r.series_uid = j.series_uid AND r.status = 'running')
                    ORDER BY not_before, id LIMIT 1 {self._db.claim_lock}""", {"now": tx.now}).fetchone()
            if row is None:
                return None
            token = tx.execute("UPDATE counters SET value = value + 1 WHERE name = 'lease_token' "
                               "RETURNING value").fetchone()[0]
            started = tx.clock()  # after the runs it saw end: the records show one run per series at a time
            claimed = tx.execute(
                f"""UPDATE jobs SET status = 'running', attempts = attempts + 1, lease_owner = :owner,
                   lease_token = :token, lease_expires_at = :expires, updated_at = :now WHERE id = :id
                   RETURNING {_JOB_COLUMNS}""",
                {"owner": owner, "token": token, "expires": started + lease_s, "now": started, "id": row[0]}).fetchone()
            tx.execute("INSERT INTO runs (job_id, series_uid, token, owner, started_at) VALUES (?, ?, ?, ?, ?)",
                       (row[0], row[1], token, owner, started))
            return _job(claimed)

        return self._db.write(take)

    def _settle_expired_leases(self, tx: Transaction, max_attempts: int) -> None:
        """Runs whose lease expired end at their expiry; their jobs are queued again, or fail past max_attempts."""
        params = {"now": tx.now, "max": max_attempts, "outcome": str(RunOutcome.LEASE_EXPIRED)}
        tx.execute(
            """UPDATE runs SET ended_at = (SELECT lease_expires_at FROM jobs WHERE jobs.lease_token = runs.token),
               outcome = :outcome WHERE ended_at IS NULL AND token IN
               (SELECT lease_token FROM jobs WHERE status = 'running' AND lease_expires_at < :now)""", params)
        tx.execute(
            """UPDATE jobs SET status = 'failed', finished_at = :now, updated_at = :now, lease_owner = NULL,
               last_error = 'worker stopped during the job ' || attempts || ' times (lease expired); last error: '
                            || COALESCE(last_error, 'none')
               WHERE status = 'running' AND lease_expires_at < :now AND attempts >= :max""", params)
        tx.execute(
            """UPDATE jobs SET status = 'queued', updated_at = :now, lease_owner = NULL, lease_expires_at = NULL
               WHERE status = 'running' AND lease_expires_at < :now""", params)

    def renew(self, job_id: int, token: int, lease_s: float) -> bool:
        """Extend the lease; False means the lease was lost and the worker must drop the job."""

        def extend(tx: Transaction) -> bool:
            return tx.execute(f"UPDATE jobs SET lease_expires_at = :until, updated_at = :now WHERE {_HELD}",
                              {"until": tx.now + lease_s, "now": tx.now, "id": job_id, "token": token}).rowcount == 1

        return self._db.write(extend)

    def lease_is_current(self, job_id: int, token: int) -> bool:
        """Whether `token` holds job `job_id` now: what serve checks before it serves or stores for a worker."""
        now = self._db.now()
        return bool(self._db.read(f"SELECT 1 FROM jobs WHERE {_HELD}", {"id": job_id, "token": token, "now": now}))

    def stage_deliveries(self, job_id: int, token: int, deliveries: list[NewDelivery]) -> bool:
        """Deliveries that become pending only if the job completes under this token (STOWed results)."""

        def stage(tx: Transaction) -> bool:
            if not tx.execute(f"SELECT 1 FROM jobs WHERE {_HELD}", {"id": job_id, "token": token, "now": tx.now}).fetchone():
                return False
            tx.executemany("""INSERT INTO staged_deliveries (job_id, token, destination, file) VALUES (?, ?, ?, ?)
                              ON CONFLICT (job_id, token, destination, file) DO NOTHING""",
                           [(job_id, token, d.destination, d.file) for d in deliveries])
            return True

        return self._db.write(stage)

    def complete(self, job_id: int, token: int, result: dict[str, Any], deliveries: list[NewDelivery]) -> bool:
        """Mark the job done and queue its deliveries (and those staged under `token`) in one transaction,
        only while `token` holds the lease. Repeating it after a lost answer changes nothing and says True."""

        def finish(tx: Transaction) -> bool:
            params = {"id": job_id, "token": token, "now": tx.now, "result": json.dumps(result)}
            done = tx.execute(f"""UPDATE jobs SET status = 'done', result = :result, last_error = NULL, lease_owner = NULL,
                                  lease_expires_at = NULL, finished_at = :now, updated_at = :now WHERE {_HELD}""",
                              params).rowcount == 1
            if not done:
                return bool(tx.execute("SELECT 1 FROM jobs WHERE id = ? AND status = 'done' AND lease_token = ?",
                                       (job_id, token)).fetchone())
            staged = tx.execute("SELECT destination, file FROM staged_deliveries WHERE job_id = ? AND token = ?",
                                (job_id, token)).fetchall()
            rows = [(d.destination, d.file) for d in deliveries] + [tuple(r) for r in staged]
            tx.executemany(
                """INSERT INTO deliveries (job_id, destination, file, status, next_attempt_at, created_at, updated_at)
                   VALUES (?, ?, ?, 'pending', ?, ?, ?) ON CONFLICT (job_id, destination, file) DO NOTHING""",
                [(job_id, destination, file, tx.now, tx.now, tx.now) for destination, file in rows])
            tx.execute("DELETE FROM staged_deliveries WHERE job_id = ?", (job_id,))
            self._end_run(tx, token, True, RunOutcome.DONE)
            return True

        return self._db.write(finish)

    def fail(self, job_id: int, token: int, error: str, retry_in_s: float | None) -> bool:
        """Record a failed attempt: queued again `retry_in_s` from now (database clock), or failed for good when None."""

        def record(tx: Transaction) -> bool:
            status, finished = ("queued", None) if retry_in_s is not None else ("failed", tx.now)
            ok = tx.execute(
                f"""UPDATE jobs SET status = :status, last_error = :error, not_before = :retry, finished_at = :finished,
                   lease_owner = NULL, lease_expires_at = NULL, updated_at = :now WHERE {_HELD}""",
                {"status": status, "error": error, "retry": tx.now + retry_in_s if retry_in_s is not None else 0,
                 "finished": finished, "now": tx.now, "id": job_id, "token": token}).rowcount == 1
            return self._end_run(tx, token, ok, RunOutcome.FAILED)

        return self._db.write(record)

    def hold(self, job_id: int, token: int, reason: str) -> bool:
        """Park a job that cannot run yet (missing weights); the attempt does not count."""

        def park(tx: Transaction) -> bool:
            ok = tx.execute(
                f"""UPDATE jobs SET status = 'held', last_error = :reason, attempts = greatest(attempts - 1, 0),
                   lease_owner = NULL, lease_expires_at = NULL, updated_at = :now WHERE {_HELD}""",
                {"reason": reason, "now": tx.now, "id": job_id, "token": token}).rowcount == 1
            return self._end_run(tx, token, ok, RunOutcome.HELD)

        return self._db.write(park)

    def release(self, job_id: int, token: int) -> bool:
        """Hand a job back unfinished (the worker is stopping); the attempt does not count."""

        def give_back(tx: Transaction) -> bool:
            ok = tx.execute(
                f"""UPDATE jobs SET status = 'queued', attempts = greatest(attempts - 1, 0), lease_owner = NULL,
                   lease_expires_at = NULL, updated_at = :now WHERE {_HELD}""",
                {"now": tx.now, "id": job_id, "token": token}).rowcount == 1
            return self._end_run(tx, token, ok, RunOutcome.RELEASED)

        return self._db.write(give_back)

    @staticmethod
    def _end_run(tx: Transaction, token: int, changed: bool, outcome: RunOutcome) -> bool:
        """The run of `token` ends with `outcome` when its job `changed` (the token held the lease); says `changed`."""
        if changed:
            tx.execute("UPDATE runs SET ended_at = ?, outcome = ? WHERE token = ? AND ended_at IS NULL",
                       (tx.now, str(outcome), token))
        return changed

    def release_held(self) -> int:
        """Queue every held job again; returns how many."""
        return self._db.write(lambda tx: tx.execute(
            "UPDATE jobs SET status = 'queued', not_before = 0, updated_at = ? WHERE status = 'held'",
            (tx.now,)).rowcount)

    def requeue_owner(self, owner: str) -> int:
        """Give back the jobs of a worker known to be dead, without waiting for its lease to expire."""
        return self._db.write(lambda tx: tx.execute(
            "UPDATE jobs SET lease_expires_at = ? WHERE status = 'running' AND lease_owner = ?",
            (tx.now - 1, owner)).rowcount)

    def retry(self, job_id: int) -> str:
        """Operator retry: queue a failed, held or skipped job again, or resend failed deliveries."""

        def again(tx: Transaction) -> str:
            row = tx.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise StateError(f"no job {job_id}: see `paraspinal-node status` for job numbers")
            pruned_series, pruned_outbox = tx.execute(
                """SELECT series.pruned_at, jobs.outbox_pruned_at FROM jobs JOIN series USING (series_uid)
                   WHERE jobs.id = ?""", (job_id,)).fetchone()
            if row[0] in ("failed", "held", "skipped"):
                if pruned_series is not None:
                    raise StateError(f"job {job_id}: its images were removed from the spool after "
                                     "storage.retention_days: send the series to the node again")
                tx.execute("""UPDATE jobs SET status = 'queued', attempts = 0, not_before = 0, finished_at = NULL,
                              updated_at = ? WHERE id = ?""", (tx.now, job_id))
                return f"job {job_id} queued again"
            if pruned_outbox is not None:
                raise StateError(f"job {job_id}: its results were removed from the outbox after "
                                 "storage.retention_days: send the series to the node again")
            resent = tx.execute(
                """UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = ?, created_at = ?,
                   updated_at = ? WHERE job_id = ? AND status = 'failed'""", (tx.now, tx.now, tx.now, job_id)).rowcount
            if resent:
                return f"job {job_id}: {resent} failed deliveries pending again"
            raise StateError(f"job {job_id} is {row[0]} with no failed deliveries: there is nothing to retry")

        return self._db.write(again)

    # retention ------------------------------------------------------------------------------

    def prunable_series(self, cutoff: float, limit: int) -> list[tuple[str, str]]:
        """(series UID, spool folder) of this serve's series settled before `cutoff` and not yet pruned."""
        rows = self._db.read(f"SELECT series_uid, series_dir FROM series WHERE {_SETTLED_SERIES} LIMIT :limit",
                             {"cutoff": cutoff, "limit": limit, "serve": self.serve})
        return [(r[0], r[1]) for r in rows]

    def mark_series_pruned(self, series_uid: str, cutoff: float) -> bool:
        """Record that a series' images are going, if it is still settled (a retry may have queued it)."""
        return self._db.write(lambda tx: tx.execute(
            f"UPDATE series SET pruned_at = :now WHERE series_uid = :uid AND {_SETTLED_SERIES}",
            {"now": tx.now, "uid": series_uid, "cutoff": cutoff, "serve": self.serve}).rowcount == 1)

    def prunable_outboxes(self, cutoff: float, limit: int) -> list[int]:
        """This serve's jobs settled before `cutoff` whose outbox folder has not been pruned."""
        rows = self._db.read(f"SELECT id FROM jobs WHERE {_SETTLED_OUTBOX} LIMIT :limit",
                             {"cutoff": cutoff, "limit": limit, "serve": self.serve})
        return [row[0] for row in rows]

    def mark_outbox_pruned(self, job_id: int, cutoff: float) -> bool:
        """Record that a job's outbox is going, if the job is still settled."""
        return self._db.write(lambda tx: tx.execute(
            f"UPDATE jobs SET outbox_pruned_at = :now WHERE id = :id AND {_SETTLED_OUTBOX}",
            {"now": tx.now, "id": job_id, "cutoff": cutoff, "serve": self.serve}).rowcount == 1)

    def get_job(self, job_id: int) -> Job | None:
        rows = self._db.read(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def jobs(self, limit: int = 50) -> list[Job]:
        return [_job(r) for r in self._db.read(f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY id DESC LIMIT ?", (limit,))]

    def job_result(self, job_id: int) -> dict[str, Any] | None:
        rows = self._db.read("SELECT result FROM jobs WHERE id = ?", (job_id,))
        return json.loads(rows[0][0]) if rows and rows[0][0] else None

    def job_counts(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self._db.read("SELECT status, COUNT(*) FROM jobs GROUP BY status")}

    def processed(self, since: str | None) -> list[tuple[SeriesRecord, int, dict[str, Any]]]:
        """The latest done job of each series, with its measurements, oldest study first."""
        rows = self._db.read(
            f"""SELECT {_SERIES_COLUMNS}, j.id, j.result
               FROM jobs j JOIN series s ON s.series_uid = j.series_uid
               WHERE j.status = 'done' AND j.id = (SELECT MAX(id) FROM jobs k
                                                    WHERE k.series_uid = j.series_uid AND k.status = 'done')
                 AND s.study_date >= :since
               ORDER BY s.study_date, j.id""", {"since": since or ""})
        return [(SeriesRecord(*r[:_SERIES_WIDTH]), r[_SERIES_WIDTH], json.loads(r[_SERIES_WIDTH + 1])) for r in rows]

    def patient_results(self, patient_id: str, limit: int = 100) -> list[tuple[SeriesRecord, int, dict[str, Any]]]:
        """The latest done job of each series of one Patient ID, with its measurements, newest study first.

        The earlier results a new one is compared with (node.priors), and `paraspinal-node trend`.
        """
        if not patient_id:
            return []
        rows = self._db.read(
            f"""SELECT {_SERIES_COLUMNS}, j.id, j.result
               FROM series s JOIN jobs j ON j.series_uid = s.series_uid
               WHERE s.patient_id = :patient AND j.status = 'done' AND j.result IS NOT NULL
                 AND j.id = (SELECT MAX(id) FROM jobs k WHERE k.series_uid = j.series_uid AND k.status = 'done')
               ORDER BY s.study_date DESC, j.id DESC LIMIT :limit""", {"patient": patient_id, "limit": limit})
        return [(SeriesRecord(*r[:_SERIES_WIDTH]), r[_SERIES_WIDTH], json.loads(r[_SERIES_WIDTH + 1])) for r in rows]

    def runs(self, series_uid: str | None = None) -> list[Run]:
        """Every claim ever made (of one series), in the order they started."""
        rows = self._db.read(f"SELECT {_RUN_COLUMNS} FROM runs WHERE :uid = '' OR series_uid = :uid "
                             "ORDER BY started_at, token", {"uid": series_uid or ""})
        return [Run(*r[:6], RunOutcome(r[6]) if r[6] else None) for r in rows]

    # deliveries ---------------------------------------------------------------------------

    def due_deliveries(self, limit: int = 100, max_wait_s: float | None = None) -> list[Delivery]:
        """Pending deliveries of this serve's series whose time has come; also those scheduled more than
        `max_wait_s` ahead, which no backoff can schedule: the clock was set back, and they must not wait for it."""
        now = self._db.now()
        ahead = now + max_wait_s if max_wait_s is not None else float("inf")
        columns = ", ".join(f"d.{c.strip()}" for c in _DELIVERY_COLUMNS.split(","))
        rows = self._db.read(
            f"""SELECT {columns} FROM deliveries d JOIN jobs j ON j.id = d.job_id JOIN series s
                ON s.series_uid = j.series_uid WHERE d.status = 'pending' AND s.serve IN (:serve, '')
                AND (d.next_attempt_at <= :now OR d.next_attempt_at > :ahead) ORDER BY d.next_attempt_at, d.id
                LIMIT :limit""", {"serve": self.serve, "now": now, "ahead": min(ahead, 1e300), "limit": limit})
        return [_delivery(r) for r in rows]

    def mark_sent(self, delivery_id: int) -> None:
        def sent(tx: Transaction) -> None:
            changed = tx.execute("""UPDATE deliveries SET status = 'sent', attempts = attempts + 1, last_error = NULL,
                                    attempts_total = attempts_total + 1, sent_at = ?, updated_at = ?
                                    WHERE id = ? AND status = 'pending'""", (tx.now, tx.now, delivery_id)).rowcount
            if changed:  # the deliver stage: from results queued (or retried) to the destination's acknowledgement
                tx.execute(f"""INSERT INTO stage_timings (job_id, attempt, stage, seconds, recorded_at)
                               SELECT job_id, attempts, '{STAGE_DELIVER}', ? - created_at, ? FROM deliveries
                               WHERE id = ?""", (tx.now, tx.now, delivery_id))

        self._db.write(sent)

    def mark_not_sent(self, delivery_id: int, error: str, next_attempt_at: float | None) -> None:
        """Record a failed attempt: pending again at `next_attempt_at`, or failed for good when None."""
        status = "pending" if next_attempt_at is not None else "failed"
        self._db.write(lambda tx: tx.execute(
            """UPDATE deliveries SET status = ?, attempts = attempts + 1, last_error = ?,
               attempts_total = attempts_total + 1, failures_total = failures_total + 1,
               next_attempt_at = ?, updated_at = ? WHERE id = ? AND status = 'pending'""",
            (status, error, next_attempt_at if next_attempt_at is not None else tx.now, tx.now, delivery_id)))

    def deliveries(self, job_id: int | None = None) -> list[Delivery]:
        sql = f"SELECT {_DELIVERY_COLUMNS} FROM deliveries"
        rows = self._db.read(sql + " WHERE job_id = ? ORDER BY id", (job_id,)) if job_id is not None \
            else self._db.read(sql + " ORDER BY id")
        return [_delivery(r) for r in rows]

    def delivery_counts(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self._db.read("SELECT status, COUNT(*) FROM deliveries GROUP BY status")}

    def recent_errors(self, limit: int = 10) -> list[tuple[str, int, str]]:
        """(kind, id, error) of the latest job and delivery errors, newest first."""
        rows = self._db.read(
            """SELECT kind, id, last_error FROM (
                   SELECT 'job' AS kind, id, last_error, updated_at FROM jobs WHERE last_error IS NOT NULL
                   UNION ALL
                   SELECT 'delivery', id, last_error, updated_at FROM deliveries WHERE last_error IS NOT NULL) e
               ORDER BY updated_at DESC LIMIT ?""", (limit,))
        return [(r[0], r[1], r[2]) for r in rows]

    # status page and metrics --------------------------------------------------------------------

    def job_rows(self, status: JobStatus | None = None, search: str = "", offset: int = 0,
                 limit: int = 50) -> tuple[list[JobRow], int]:
        """One page of jobs, newest first, with their series; and how many match in all.

        `search` matches part of the series UID, patient ID, accession or series description.
        """
        where = """WHERE (:status = '' OR j.status = :status) AND (:search = '' OR strpos(s.series_uid, :search) > 0
                   OR strpos(s.patient_id, :search) > 0 OR strpos(s.accession, :search) > 0
                   OR strpos(lower(s.description), lower(:search)) > 0)"""
        params = {"status": "" if status is None else str(status), "search": search, "offset": offset,
                  "limit": limit}
        columns = ", ".join(f"j.{c.strip()}" for c in _JOB_COLUMNS.split(","))
        rows = self._db.read(f"""SELECT {columns}, {_SERIES_COLUMNS} FROM jobs j JOIN series s USING (series_uid)
                                 {where} ORDER BY j.id DESC LIMIT :limit OFFSET :offset""", params)
        total = self._db.read(f"SELECT COUNT(*) FROM jobs j JOIN series s USING (series_uid) {where}", params)[0][0]
        width = len(_JOB_COLUMNS.split(","))
        return [JobRow(_job(r[:width]), SeriesRecord(*r[width:])) for r in rows], total

    def record_stage_timings(self, job_id: int, attempt: int, seconds: dict[str, float]) -> None:
        """The worker's stage durations of one attempt, in the order they ran."""
        self._db.write(lambda tx: tx.executemany(
            "INSERT INTO stage_timings (job_id, attempt, stage, seconds, recorded_at) VALUES (?, ?, ?, ?, ?)",
            [(job_id, attempt, stage, s, tx.now) for stage, s in seconds.items()]))

    def stage_timings(self, job_ids: list[int]) -> list[StageTiming]:
        """Every stage timing of these jobs, oldest first."""
        marks = ", ".join("?" * len(job_ids))
        rows = self._db.read(f"SELECT {_TIMING_COLUMNS} FROM stage_timings WHERE job_id IN ({marks}) ORDER BY id",
                             tuple(job_ids)) if job_ids else []
        return [StageTiming(*r) for r in rows]

    def stage_timings_after(self, last_id: int, limit: int = 10000) -> list[StageTiming]:
        """Timings recorded after the one numbered `last_id`, so a reader can keep running totals."""
        rows = self._db.read(f"SELECT {_TIMING_COLUMNS} FROM stage_timings WHERE id > ? ORDER BY id LIMIT ?",
                             (last_id, limit))
        return [StageTiming(*r) for r in rows]

    def skip_reasons(self) -> list[tuple[str, int]]:
        """(reason, skipped jobs) for every distinct reason a series was skipped."""
        rows = self._db.read("SELECT last_error, COUNT(*) FROM jobs WHERE status = 'skipped' GROUP BY last_error")
        return [(r[0], r[1]) for r in rows]

    def oldest_queued_since(self) -> float | None:
        """Since when the longest-waiting runnable job has been waiting (a retry's delay not counted)."""
        return self._db.read("SELECT MIN(greatest(updated_at, not_before)) FROM jobs WHERE status = 'queued'")[0][0]

    def destination_totals(self) -> list[DestinationTotals]:
        rows = self._db.read(
            """SELECT destination, COUNT(*) FILTER (WHERE status = 'pending'), COUNT(*) FILTER (WHERE status = 'sent'),
                      COUNT(*) FILTER (WHERE status = 'failed'), SUM(attempts_total), SUM(failures_total)
               FROM deliveries GROUP BY destination ORDER BY destination""")
        return [DestinationTotals(*r) for r in rows]

    def report_worker(self, report: WorkerReport) -> None:
        """A worker's heartbeat: who it is, its device and engine, and which weights it misses."""
        self._db.write(lambda tx: tx.execute(
            """INSERT INTO workers (owner, host, slot, pid, device, engine, weights_missing, engine_restarts,
               started_at, heartbeat_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (owner) DO UPDATE SET device = excluded.device, engine = excluded.engine,
               weights_missing = excluded.weights_missing, engine_restarts = excluded.engine_restarts,
               heartbeat_at = excluded.heartbeat_at""",
            (report.owner, report.host, report.index, report.pid, report.device, report.engine,
             json.dumps(list(report.weights_missing)), report.engine_restarts, tx.now, tx.now)))

    def workers(self) -> list[WorkerRecord]:
        """Every worker process that ever reported, newest start first."""
        rows = self._db.read("""SELECT owner, host, pid, slot, device, engine, weights_missing, engine_restarts,
                                started_at, heartbeat_at FROM workers ORDER BY started_at DESC""")
        return [WorkerRecord(WorkerReport(*r[:6], tuple(json.loads(r[6])), r[7]), r[8], r[9]) for r in rows]

    def leases(self) -> dict[str, Lease]:
        """Lease owner → its lease, for every job running under a live lease."""
        rows = self._db.read("""SELECT id, lease_owner, lease_token, lease_expires_at FROM jobs
                                WHERE status = 'running' AND lease_expires_at >= ?""", (self._db.now(),))
        return {r[1]: Lease(*r) for r in rows}

    def running_owners(self) -> dict[str, int]:
        """Lease owner → job for every job running under a live lease."""
        return {owner: lease.job_id for owner, lease in self.leases().items()}

    def host_throughput(self, window_s: float) -> list[HostThroughput]:
        """Per worker host: jobs finished in the last `window_s` seconds (database clock) and running now."""
        now = self._db.now()
        rows = self._db.read(
            """SELECT w.host, COUNT(*) FILTER (WHERE r.outcome = 'done' AND r.ended_at >= :since),
                      COUNT(*) FILTER (WHERE r.ended_at IS NULL AND j.status = 'running' AND j.lease_token = r.token
                                       AND j.lease_expires_at >= :now)
               FROM runs r JOIN workers w ON w.owner = r.owner JOIN jobs j ON j.id = r.job_id
               WHERE r.ended_at IS NULL OR r.ended_at >= :since GROUP BY w.host ORDER BY w.host""",
            {"since": now - window_s, "now": now})
        return [HostThroughput(*r) for r in rows]

    def check_writable(self) -> None:
        """Raises when the database cannot take a write (read-only, disk full, locked too long, unreachable)."""
        self._db.write(lambda tx: tx.execute(
            "INSERT INTO probe (id, at) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET at = excluded.at", (tx.now,)))


def _job(row: tuple) -> Job:
    return Job(row[0], row[1], row[2], row[3], JobStatus(row[4]), *row[5:13], token=row[13] or 0)


def _delivery(row: tuple) -> Delivery:
    return Delivery(row[0], row[1], row[2], row[3], DeliveryStatus(row[4]), *row[5:])
