"""The schema of both backends as numbered migrations: SQLite (the single-host default) and PostgreSQL.

SQLite keeps its history, so a database from any earlier release is migrated in place. PostgreSQL
came with schema 4, so its first migration creates what SQLite reached by then. A new migration is
added to both lists, keeping them at the same number: State refuses a database newer than it knows.
"""

from __future__ import annotations

SQLITE: tuple[str, ...] = (
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
    """
    ALTER TABLE jobs ADD COLUMN lease_token INTEGER;
    CREATE UNIQUE INDEX one_running_job_per_series ON jobs (series_uid) WHERE status = 'running';
    CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO counters (name, value) VALUES ('lease_token', 0);
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        series_uid TEXT NOT NULL,
        token INTEGER NOT NULL UNIQUE,
        owner TEXT NOT NULL,
        started_at REAL NOT NULL,
        ended_at REAL,
        outcome TEXT
    );
    CREATE INDEX runs_by_series ON runs (series_uid, started_at);
    CREATE TABLE staged_deliveries (
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        token INTEGER NOT NULL,
        destination TEXT NOT NULL,
        file TEXT NOT NULL,
        UNIQUE (job_id, token, destination, file)
    );
    CREATE TABLE serves (
        name TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        dicomweb_url TEXT NOT NULL,
        started_at REAL NOT NULL,
        heartbeat_at REAL NOT NULL
    );
    ALTER TABLE series ADD COLUMN serve TEXT NOT NULL DEFAULT '';
    """,
    # Backfill (issue 21): each backfill's search progress (the next day to search) and its candidate series.
    """
    CREATE TABLE backfills (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        serve TEXT NOT NULL,
        date_from TEXT NOT NULL,
        date_to TEXT NOT NULL,
        query TEXT NOT NULL,
        send_results INTEGER NOT NULL,
        next_day TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('running', 'done', 'cancelled')),
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        finished_at REAL
    );
    CREATE TABLE backfill_series (
        series_uid TEXT PRIMARY KEY,
        backfill_id INTEGER NOT NULL REFERENCES backfills(id),
        study_uid TEXT NOT NULL,
        study_date TEXT NOT NULL,
        expected INTEGER NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('found', 'retrieved', 'measured', 'failed')),
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        not_before REAL NOT NULL DEFAULT 0,
        last_attempt_at REAL,
        retrieved_at REAL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX backfill_series_due ON backfill_series (backfill_id, status, not_before);
    CREATE INDEX backfill_series_attempts ON backfill_series (last_attempt_at);
    """,
    """
    CREATE INDEX series_by_patient ON series (patient_id, study_date);
    """,
)

POSTGRESQL: tuple[str, ...] = (
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
        updated_at DOUBLE PRECISION NOT NULL,
        pruned_at DOUBLE PRECISION,
        serve TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE jobs (
        id INTEGER GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        series_uid TEXT NOT NULL REFERENCES series(series_uid),
        fingerprint TEXT NOT NULL,
        series_dir TEXT NOT NULL,
        status TEXT NOT NULL
            CHECK (status IN ('queued', 'running', 'done', 'failed', 'skipped', 'held')),
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        lease_owner TEXT,
        lease_expires_at DOUBLE PRECISION,
        not_before DOUBLE PRECISION NOT NULL DEFAULT 0,
        result TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        finished_at DOUBLE PRECISION,
        outbox_pruned_at DOUBLE PRECISION,
        lease_token BIGINT,
        UNIQUE (series_uid, fingerprint)
    );
    CREATE INDEX jobs_by_status ON jobs (status, not_before);
    CREATE UNIQUE INDEX one_running_job_per_series ON jobs (series_uid) WHERE status = 'running';
    CREATE TABLE deliveries (
        id INTEGER GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        destination TEXT NOT NULL,
        file TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('pending', 'sent', 'failed')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at DOUBLE PRECISION NOT NULL,
        last_error TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        sent_at DOUBLE PRECISION,
        attempts_total INTEGER NOT NULL DEFAULT 0,
        failures_total INTEGER NOT NULL DEFAULT 0,
        UNIQUE (job_id, destination, file)
    );
    CREATE INDEX deliveries_due ON deliveries (status, next_attempt_at);
    CREATE TABLE stage_timings (
        id INTEGER GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        attempt INTEGER NOT NULL,
        stage TEXT NOT NULL,
        seconds DOUBLE PRECISION NOT NULL,
        recorded_at DOUBLE PRECISION NOT NULL
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
        started_at DOUBLE PRECISION NOT NULL,
        heartbeat_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE probe (id INTEGER PRIMARY KEY CHECK (id = 1), at DOUBLE PRECISION NOT NULL);
    CREATE TABLE counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
    INSERT INTO counters (name, value) VALUES ('lease_token', 0);
    CREATE TABLE runs (
        id INTEGER GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        series_uid TEXT NOT NULL,
        token BIGINT NOT NULL UNIQUE,
        owner TEXT NOT NULL,
        started_at DOUBLE PRECISION NOT NULL,
        ended_at DOUBLE PRECISION,
        outcome TEXT
    );
    CREATE INDEX runs_by_series ON runs (series_uid, started_at);
    CREATE TABLE staged_deliveries (
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        token BIGINT NOT NULL,
        destination TEXT NOT NULL,
        file TEXT NOT NULL,
        UNIQUE (job_id, token, destination, file)
    );
    CREATE TABLE serves (
        name TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        dicomweb_url TEXT NOT NULL,
        started_at DOUBLE PRECISION NOT NULL,
        heartbeat_at DOUBLE PRECISION NOT NULL
    );
    """,
    """
    CREATE TABLE backfills (
        id INTEGER GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        serve TEXT NOT NULL,
        date_from TEXT NOT NULL,
        date_to TEXT NOT NULL,
        query TEXT NOT NULL,
        send_results INTEGER NOT NULL,
        next_day TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('running', 'done', 'cancelled')),
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        finished_at DOUBLE PRECISION
    );
    CREATE TABLE backfill_series (
        series_uid TEXT PRIMARY KEY,
        backfill_id INTEGER NOT NULL REFERENCES backfills(id),
        study_uid TEXT NOT NULL,
        study_date TEXT NOT NULL,
        expected INTEGER NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('found', 'retrieved', 'measured', 'failed')),
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        not_before DOUBLE PRECISION NOT NULL DEFAULT 0,
        last_attempt_at DOUBLE PRECISION,
        retrieved_at DOUBLE PRECISION,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX backfill_series_due ON backfill_series (backfill_id, status, not_before);
    CREATE INDEX backfill_series_attempts ON backfill_series (last_attempt_at);
    """,
    """
    CREATE INDEX series_by_patient ON series (patient_id, study_date);
    """,
)

SCHEMA_VERSION = len(SQLITE)
FIRST_POSTGRESQL_VERSION = SCHEMA_VERSION - len(POSTGRESQL) + 1  # PostgreSQL's first migration creates this version


def statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
