-- Tasks, the callback log, idempotency keys, subscriptions, the outbox
-- (events, deliveries, attempts) and background jobs: the same tables,
-- columns and indexes as SQLite's 0001, so one row mapper serves both.
-- Times are unix seconds (double precision); JSON is stored as text, bodies as bytea.

CREATE TABLE tasks (
    id               text PRIMARY KEY,
    provider         text NOT NULL,
    model            text,
    state            text NOT NULL,
    upstream_task_id text,
    request          text NOT NULL,
    result           text,
    error            text,
    metadata         text NOT NULL,
    sequence         integer NOT NULL,
    notify_url       text,
    warnings         text NOT NULL,
    origin           text NOT NULL,
    created_at       double precision NOT NULL,
    updated_at       double precision NOT NULL,
    completed_at     double precision,
    expires_at       double precision NOT NULL
);
CREATE UNIQUE INDEX tasks_upstream ON tasks (provider, upstream_task_id)
    WHERE upstream_task_id IS NOT NULL;
CREATE INDEX tasks_state ON tasks (state, id);
CREATE INDEX tasks_open_expiry ON tasks (expires_at)
    WHERE state IN ('queued', 'submitted', 'running');

CREATE TABLE callbacks (
    id             text PRIMARY KEY,
    task_id        text NOT NULL REFERENCES tasks (id),
    received_at    double precision NOT NULL,
    body           bytea NOT NULL,
    headers        text NOT NULL,
    body_sha256    text NOT NULL,
    verdict        text NOT NULL,
    reason         text,
    dialect        text,
    reported_state text
);
CREATE INDEX callbacks_task ON callbacks (task_id, body_sha256);

CREATE TABLE idempotency_keys (
    key         text PRIMARY KEY,
    fingerprint text NOT NULL,
    task_id     text NOT NULL REFERENCES tasks (id),
    created_at  double precision NOT NULL
);

CREATE TABLE subscriptions (
    id                         text PRIMARY KEY,
    url                        text NOT NULL,
    events                     text NOT NULL,
    description                text,
    secret                     text NOT NULL,
    previous_secret            text,
    previous_secret_expires_at double precision,
    enabled                    boolean NOT NULL,
    disabled_reason            text,
    failing_since              double precision,
    task_id                    text,
    uses_notify_secret         boolean NOT NULL DEFAULT false,
    created_at                 double precision NOT NULL,
    updated_at                 double precision NOT NULL
);
CREATE INDEX subscriptions_task ON subscriptions (task_id);

CREATE TABLE events (
    id         text PRIMARY KEY,
    task_id    text,
    type       text NOT NULL,
    sequence   integer NOT NULL,
    body       bytea NOT NULL,
    created_at double precision NOT NULL
);
CREATE INDEX events_task ON events (task_id, sequence);

CREATE TABLE deliveries (
    id              text PRIMARY KEY,
    event_id        text NOT NULL REFERENCES events (id),
    subscription_id text NOT NULL,
    task_id         text,
    event_type      text NOT NULL,
    sequence        integer NOT NULL,
    status          text NOT NULL,
    attempt_count   integer NOT NULL DEFAULT 0,
    next_attempt_at double precision,
    lease_owner     text,
    lease_until     double precision,
    created_at      double precision NOT NULL,
    updated_at      double precision NOT NULL
);
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX deliveries_order ON deliveries (subscription_id, task_id, sequence)
    WHERE status = 'pending';
CREATE INDEX deliveries_subscription ON deliveries (subscription_id, id);
CREATE INDEX deliveries_task ON deliveries (task_id, id);

CREATE TABLE delivery_attempts (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id   text NOT NULL REFERENCES deliveries (id),
    at            double precision NOT NULL,
    status_code   integer,
    latency_ms    double precision NOT NULL,
    error         text,
    response_body text
);
CREATE INDEX delivery_attempts_delivery ON delivery_attempts (delivery_id, id);

CREATE TABLE jobs (
    id          text PRIMARY KEY,
    kind        text NOT NULL,
    task_id     text NOT NULL,
    run_at      double precision NOT NULL,
    attempts    integer NOT NULL DEFAULT 0,
    payload     text NOT NULL,
    lease_owner text,
    lease_until double precision,
    created_at  double precision NOT NULL,
    UNIQUE (kind, task_id)
);
CREATE INDEX jobs_due ON jobs (kind, run_at);
