-- The state database as its first schema created it (schema version 1), for the migration test.
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
