-- Tasks, the callback log, idempotency keys, subscriptions, the outbox
-- (events, deliveries, attempts) and background jobs.
-- Times are unix seconds (REAL); JSON is stored as text, bodies as blobs.

CREATE TABLE tasks (
    id               TEXT PRIMARY KEY,
    provider         TEXT NOT NULL,
    model            TEXT,
    state            TEXT NOT NULL,
    upstream_task_id TEXT,
    request          TEXT NOT NULL,
    result           TEXT,
    error            TEXT,
    metadata         TEXT NOT NULL,
    sequence         INTEGER NOT NULL,
    notify_url       TEXT,
    warnings         TEXT NOT NULL,
    origin           TEXT NOT NULL,
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL,
    completed_at     REAL,
    expires_at       REAL NOT NULL
);
CREATE UNIQUE INDEX tasks_upstream ON tasks (provider, upstream_task_id)
    WHERE upstream_task_id IS NOT NULL;
CREATE INDEX tasks_state ON tasks (state, id);
CREATE INDEX tasks_open_expiry ON tasks (expires_at)
    WHERE state IN ('queued', 'submitted', 'running');

CREATE TABLE callbacks (
    id             TEXT PRIMARY KEY,
    task_id        TEXT NOT NULL REFERENCES tasks (id),
    received_at    REAL NOT NULL,
    body           BLOB NOT NULL,
    headers        TEXT NOT NULL,
    body_sha256    TEXT NOT NULL,
    verdict        TEXT NOT NULL,
    reason         TEXT,
    dialect        TEXT,
    reported_state TEXT
);
CREATE INDEX callbacks_task ON callbacks (task_id, body_sha256);

CREATE TABLE idempotency_keys (
    key         TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    task_id     TEXT NOT NULL REFERENCES tasks (id),
    created_at  REAL NOT NULL
);

CREATE TABLE subscriptions (
    id                         TEXT PRIMARY KEY,
    url                        TEXT NOT NULL,
    events                     TEXT NOT NULL,
    description                TEXT,
    secret                     TEXT NOT NULL,
    previous_secret            TEXT,
    previous_secret_expires_at REAL,
    enabled                    INTEGER NOT NULL,
    disabled_reason            TEXT,
    failing_since              REAL,
    task_id                    TEXT,
    uses_notify_secret         INTEGER NOT NULL DEFAULT 0,
    created_at                 REAL NOT NULL,
    updated_at                 REAL NOT NULL
);
CREATE INDEX subscriptions_task ON subscriptions (task_id);

CREATE TABLE events (
    id         TEXT PRIMARY KEY,
    task_id    TEXT,
    type       TEXT NOT NULL,
    sequence   INTEGER NOT NULL,
    body       BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX events_task ON events (task_id, sequence);

CREATE TABLE deliveries (
    id              TEXT PRIMARY KEY,
    event_id        TEXT NOT NULL REFERENCES events (id),
    subscription_id TEXT NOT NULL,
    task_id         TEXT,
    event_type      TEXT NOT NULL,
    sequence        INTEGER NOT NULL,
    status          TEXT NOT NULL,
    attempt_count   INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,
    lease_owner     TEXT,
    lease_until     REAL,
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL
);
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX deliveries_order ON deliveries (subscription_id, task_id, sequence)
    WHERE status = 'pending';
CREATE INDEX deliveries_subscription ON deliveries (subscription_id, id);
CREATE INDEX deliveries_task ON deliveries (task_id, id);

CREATE TABLE delivery_attempts (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery_id   TEXT NOT NULL REFERENCES deliveries (id),
    at            REAL NOT NULL,
    status_code   INTEGER,
    latency_ms    REAL NOT NULL,
    error         TEXT,
    response_body TEXT
);
CREATE INDEX delivery_attempts_delivery ON delivery_attempts (delivery_id, id);

CREATE TABLE jobs (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    task_id     TEXT NOT NULL,
    run_at      REAL NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    payload     TEXT NOT NULL,
    lease_owner TEXT,
    lease_until REAL,
    created_at  REAL NOT NULL,
    UNIQUE (kind, task_id)
);
CREATE INDEX jobs_due ON jobs (kind, run_at);
