-- fleetq embedded store, schema version 1.
CREATE TABLE IF NOT EXISTS jobs (
    id              TEXT PRIMARY KEY,
    service         TEXT NOT NULL,
    status          TEXT NOT NULL,
    partition       TEXT NOT NULL,
    order_key       TEXT NOT NULL,
    -- 1 while pending and due: the only rows a claim looks at.
    claimable       INTEGER NOT NULL DEFAULT 0,
    -- pending but waiting for a retry backoff until this time (ms).
    run_at          INTEGER,
    -- running: the lease expiry (ms).
    lease_deadline  INTEGER,
    workflow_id     TEXT,
    idempotency_key TEXT UNIQUE,
    created_at      INTEGER NOT NULL,
    finished_at     INTEGER,
    progress_evt_at INTEGER,
    progress_dirty  INTEGER NOT NULL DEFAULT 0,
    -- a job given back by a worker avoids that worker until avoid_until (ms) if others can take it.
    avoid_worker    TEXT,
    avoid_until     INTEGER,
    summary         TEXT NOT NULL,
    spec            TEXT NOT NULL,
    outcome         TEXT
) STRICT;
CREATE INDEX IF NOT EXISTS jobs_claim   ON jobs(partition, order_key) WHERE claimable = 1;
CREATE INDEX IF NOT EXISTS jobs_wf      ON jobs(workflow_id, order_key) WHERE claimable = 1;
-- queue order and position per service and across services (a position is an index range count).
CREATE INDEX IF NOT EXISTS jobs_queue   ON jobs(service, order_key) WHERE claimable = 1;
CREATE INDEX IF NOT EXISTS jobs_order   ON jobs(order_key) WHERE claimable = 1;
CREATE INDEX IF NOT EXISTS jobs_delayed ON jobs(run_at) WHERE status = 'pending' AND claimable = 0;
CREATE INDEX IF NOT EXISTS jobs_lease   ON jobs(lease_deadline) WHERE lease_deadline IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_list    ON jobs(created_at, id);
CREATE INDEX IF NOT EXISTS jobs_status  ON jobs(status, created_at, id);
CREATE INDEX IF NOT EXISTS jobs_done    ON jobs(finished_at) WHERE finished_at IS NOT NULL;
-- a partition lives while one of its jobs is unfinished.
CREATE INDEX IF NOT EXISTS jobs_live    ON jobs(partition) WHERE finished_at IS NULL;

-- the live partitions: those with an unfinished job.
CREATE TABLE IF NOT EXISTS partitions (
    key        TEXT PRIMARY KEY,
    spec       TEXT NOT NULL,
    unworkable INTEGER NOT NULL DEFAULT 0
) STRICT;

CREATE TABLE IF NOT EXISTS events (
    seq  INTEGER PRIMARY KEY AUTOINCREMENT,
    at   INTEGER NOT NULL,
    body TEXT NOT NULL
) STRICT;

CREATE TABLE IF NOT EXISTS workers (
    id        TEXT PRIMARY KEY,
    info      TEXT NOT NULL,
    last_seen INTEGER NOT NULL
) STRICT;

-- services whose queue is paused (nothing of them is claimed).
CREATE TABLE IF NOT EXISTS paused_services (
    service TEXT PRIMARY KEY
) STRICT;

CREATE TABLE IF NOT EXISTS meta (
    k TEXT PRIMARY KEY,
    v INTEGER NOT NULL
) STRICT;
INSERT OR IGNORE INTO meta(k, v) VALUES ('job_seq', 0);
INSERT OR IGNORE INTO meta(k, v) VALUES ('log_epoch', 0);

CREATE TABLE IF NOT EXISTS machines (
    id    TEXT PRIMARY KEY,
    state TEXT NOT NULL
) STRICT;

-- fair share (fleetq_core::fair): a service's virtual time, a customer's finish tag per service, a
-- workflow's kept key time.
CREATE TABLE IF NOT EXISTS fair_clock (
    service TEXT PRIMARY KEY,
    v       INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS fair_finish (
    service  TEXT NOT NULL,
    customer TEXT NOT NULL,
    finish   INTEGER NOT NULL,
    PRIMARY KEY (service, customer)
) STRICT;
CREATE TABLE IF NOT EXISTS fair_workflows (
    workflow_id TEXT PRIMARY KEY,
    t           INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL
) STRICT;

-- How each job's attempts ended (fleetq_core::AttemptEnd), a JSON array of the newest
-- fleetq_core::job::HISTORY_LEN; a row appears with the first attempt's end.
CREATE TABLE IF NOT EXISTS job_history (
    job_id  TEXT PRIMARY KEY,
    entries TEXT NOT NULL
) STRICT;
