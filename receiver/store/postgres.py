"""The PostgreSQL store: several receiver instances on one database.

    store = PostgresStore("postgresql://user:pw@host/db?schema=receiver", clock=time.time)
    await store.open()        # pool, migrations (under an advisory lock), listener

Every write is one transaction on a pooled connection (asyncpg). A task's
changes are serialised by `SELECT … FOR UPDATE` of its row and decided by the
same pure functions as in SQLite (receiver.tasks), with the same outbox rows
(receiver.store.outbox). Work is shared, not repeated: deliveries, jobs and
expiry sweeps are claimed with `FOR UPDATE SKIP LOCKED` and leases that expire,
so a dead instance's work is taken over.

Each commit that changed a task or gave workers something to do sends one
NOTIFY (the task ids, the topics to wake and the sender's instance id; it is
delivered on commit). One dedicated connection per instance LISTENs,
reconnects when it drops, and publishes what other instances committed on
this instance's ChangeFeed, so long-polls, SSE and workers react wherever
the write happened.

URL query parameters the receiver reads (others go to the server, as asyncpg does):
`schema=name` (tables live in that schema, created if missing; several
deployments or test runs can share one database) and `pool_size=N`
(connections per instance, default 10; the listener uses one more).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import secrets
from collections.abc import AsyncIterator, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import orjson

from receiver.broadcast import CALLBACK, DELIVERY, ChangeFeed
from receiver.clock import system_clock
from receiver.errors import InvalidRequest, NotFound, StoreError, TaskMismatch
from receiver.events import event_body, task_event_body
from receiver.logs import get_logger
from receiver.store import migrations
from receiver.store.base import (
    Applied,
    AttemptOutcome,
    CreatedTask,
    Decide,
    Delivery,
    DeliveryJob,
    DeliveryQuery,
    IdempotencyKey,
    IncomingCallback,
    Job,
    Lease,
    StoredCallback,
    Subscription,
    TaskQuery,
)
from receiver.store.outbox import (
    CALLBACK_COLUMNS,
    DELIVERIES,
    DELIVERY_COLUMNS,
    EVENT_COLUMNS,
    JOB_COLUMNS,
    JOBS,
    EventRow,
    announce,
    callback_row,
    delivery_rows,
    job_row,
    jobs_kept,
    lease_for,
    logs_callback,
    new_event,
    offer,
    wakes,
    wanting,
)
from receiver.store.rows import (
    SUBSCRIPTION_COLUMNS,
    TASK_COLUMNS,
    Row,
    attempt_from_row,
    callback_from_row,
    check_subscription_changes,
    delivery_from_row,
    dumps_optional,
    job_from_row,
    page_query,
    subscription_from_row,
    subscription_params,
    task_changes,
    task_from_row,
    task_params,
)
from receiver.tasks import JobSpec, Report, Task, Transition, apply_report, expire
from receiver.types import JSON, Clock, DeliveryStatus, EventType, TaskState

log = get_logger("receiver.store")

#: What a broken or unreachable database raises through asyncpg.
# InternalClientError: a connection cut in the middle of an operation ("cannot switch to state …").
DRIVER_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
)
_LINK_ERRORS: tuple[type[Exception], ...] = (*DRIVER_ERRORS, StoreError, TimeoutError)

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_DEFAULT_POOL_SIZE = 10
_OPEN_STATES = "(" + ", ".join(f"'{s.value}'" for s in TaskState if not s.terminal) + ")"
_MIGRATION_LOCK = "receiver.migrate:"  # + schema: one advisory lock per deployment
_NOTIFY_IDS = 100  # task ids per NOTIFY payload (payloads must stay under 8000 bytes)
_KEEPALIVE = 15.0  # seconds between checks that the listener connection still answers
_CATCH_UP_SLACK = 60.0  # seconds before a listener outage whose changes are republished
_CATCH_UP_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class ConnectTarget:
    """A database URL split into what asyncpg gets and what the receiver reads itself."""

    dsn: str
    schema: str | None = None
    pool_size: int = _DEFAULT_POOL_SIZE


def parse_url(url: str) -> ConnectTarget:
    """`postgresql://u@h/db?schema=s&pool_size=5&sslmode=require` -> the asyncpg DSN without
    the receiver's own parameters; ValueError names a bad one."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"not a PostgreSQL URL: scheme {parts.scheme!r}")
    schema: str | None = None
    pool_size = _DEFAULT_POOL_SIZE
    rest = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "schema":
            if not _SCHEMA_NAME.match(value):
                raise ValueError(f"schema must be a lower-case SQL name ([a-z_][a-z0-9_]*), got {value!r}")
            schema = value
        elif key == "pool_size":
            if not value.isdigit() or not 1 <= int(value) <= 1000:
                raise ValueError(f"pool_size must be an integer from 1 to 1000, got {value!r}")
            pool_size = int(value)
        else:
            rest.append((key, value))
    return ConnectTarget(urlunsplit(parts._replace(query=urlencode(rest))), schema, pool_size)


def channel_name(schema: str) -> str:
    """The NOTIFY channel of the deployment whose tables live in `schema` (at most 63 bytes)."""
    name = f"receiver_{schema}"
    if len(name.encode()) <= 63:
        return name
    return "receiver_" + hashlib.sha256(schema.encode()).hexdigest()[:40]


def _lock_key(schema: str) -> int:
    digest = hashlib.sha256((_MIGRATION_LOCK + schema).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _insert(table: str, columns: Sequence[str]) -> str:
    marks = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})"


def _update(table: str, columns: Sequence[str]) -> str:
    """`UPDATE table SET c2 = $2, … WHERE id = $1` (columns[0] is the id)."""
    sets = ", ".join(f"{c} = ${i}" for i, c in enumerate(columns[1:], start=2))
    return f"UPDATE {table} SET {sets} WHERE {columns[0]} = $1"


def _values(row: Mapping[str, Any], columns: Sequence[str]) -> tuple[Any, ...]:
    return tuple(row[c] for c in columns)


def _rowcount(status: str) -> int:
    """asyncpg's command status (`UPDATE 3`) -> 3."""
    return int(status.rsplit(" ", 1)[-1])


def _numbered(n: int) -> str:
    """PostgreSQL's n-th query parameter."""
    return f"${n}"


_INSERT_TASK = _insert("tasks", TASK_COLUMNS)
_INSERT_SUBSCRIPTION = _insert("subscriptions", SUBSCRIPTION_COLUMNS)
_UPDATE_SUBSCRIPTION = _update("subscriptions", SUBSCRIPTION_COLUMNS) + " RETURNING *"
_INSERT_EVENT = _insert("events", EVENT_COLUMNS)
_INSERT_DELIVERY = _insert("deliveries", DELIVERY_COLUMNS)
_INSERT_CALLBACK = _insert("callbacks", CALLBACK_COLUMNS)
_SCHEDULE_JOB = (
    _insert("jobs", JOB_COLUMNS) + " ON CONFLICT (kind, task_id) DO UPDATE SET run_at = excluded.run_at,"
    " payload = excluded.payload, lease_owner = NULL, lease_until = NULL RETURNING *"
)
_TASK_SUBSCRIBERS = "SELECT * FROM subscriptions WHERE enabled AND (task_id IS NULL OR task_id = $1)"
_GLOBAL_SUBSCRIBERS = "SELECT * FROM subscriptions WHERE enabled AND task_id IS NULL"
_ONE_SUBSCRIBER = "SELECT * FROM subscriptions WHERE id = $1"

# A pending delivery waits while an earlier event of its subscription and task is pending.
_FIRST_IN_LINE = """NOT EXISTS (
               SELECT 1 FROM deliveries p
                WHERE p.status = 'pending' AND p.subscription_id = d.subscription_id
                  AND p.task_id = d.task_id AND p.sequence < d.sequence)"""

# Due, unleased deliveries of enabled subscriptions (but those of $5), never one whose earlier
# event (same subscription and task) is still pending; rows another instance is claiming are skipped.
_CLAIM_DELIVERIES = f"""
WITH due AS (
    SELECT d.id, d.subscription_id, d.next_attempt_at FROM deliveries d JOIN subscriptions s ON s.id = d.subscription_id
     WHERE d.status = 'pending' AND d.next_attempt_at <= $3
       AND (d.lease_until IS NULL OR d.lease_until < $3)
       AND s.enabled
       AND NOT (d.subscription_id = ANY($5::text[]))
       AND {_FIRST_IN_LINE}
     ORDER BY d.next_attempt_at, d.id
     LIMIT $6),
ranked AS (
    SELECT id FROM (
        SELECT id, row_number() OVER (PARTITION BY subscription_id ORDER BY next_attempt_at, id) AS rank FROM due
    ) numbered WHERE rank <= $7),
claimed AS (
    UPDATE deliveries SET lease_owner = $1, lease_until = $2
     WHERE id IN (
        SELECT d.id FROM deliveries d
         WHERE d.id IN (SELECT id FROM ranked)
           AND d.status = 'pending' AND (d.lease_until IS NULL OR d.lease_until < $3)
         ORDER BY d.next_attempt_at, d.id
         LIMIT $4
         FOR UPDATE OF d SKIP LOCKED)
    RETURNING *)
SELECT c.*, e.body AS event_body FROM claimed c JOIN events e ON e.id = c.event_id
 ORDER BY c.next_attempt_at, c.id
"""

_CLAIM_JOBS = """
UPDATE jobs SET lease_owner = $1, lease_until = $2
 WHERE id IN (
    SELECT id FROM jobs
     WHERE kind = ANY($3::text[]) AND run_at <= $4 AND (lease_until IS NULL OR lease_until < $4)
     ORDER BY run_at, id
     LIMIT $5
     FOR UPDATE SKIP LOCKED)
RETURNING *
"""

_DUE_FOR_EXPIRY = (
    f"SELECT * FROM tasks WHERE state IN {_OPEN_STATES} AND expires_at <= $1"
    " ORDER BY expires_at, id LIMIT $2 FOR UPDATE SKIP LOCKED"
)


class _KeyTaken(Exception):
    """Another transaction committed the same idempotency key first."""


class PostgresStore:
    """The store for several instances on one PostgreSQL database (see the module docstring)."""

    backend = "postgresql"

    def __init__(self, url: str, *, clock: Clock = system_clock, feed: ChangeFeed | None = None) -> None:
        target = parse_url(url)
        self._dsn = target.dsn
        self.schema = target.schema
        self.pool_size = target.pool_size
        self.clock = clock
        self.feed = feed or ChangeFeed()
        self.instance = secrets.token_hex(8)  # tells our own notifications from the others'
        self.channel = ""
        self._pool: asyncpg.Pool | None = None
        self._listener: _Listener | None = None

    def _server_settings(self, application_name: str, **more: str) -> dict[str, str]:
        settings = {"application_name": application_name, **more}
        if self.schema is not None:
            settings["search_path"] = self.schema
        return settings

    # Lifecycle -----------------------------------------------------------------
    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=self.pool_size,
                # A transaction whose instance vanished (a lost machine, not just a killed process)
                # must not hold its task's row lock for hours: the server ends it.
                server_settings=self._server_settings("receiver", idle_in_transaction_session_timeout="60s"),
                reset=_keep_session,
            )
        except DRIVER_ERRORS as exc:  # never echo the URL: it may carry a password
            raise StoreError(f"cannot connect to PostgreSQL: {exc}") from exc
        try:
            if self.schema is None:
                self.schema = await self._pool.fetchval("SELECT current_schema()")
                if self.schema is None:
                    raise StoreError("no schema to use: the search_path names none that exists; add ?schema=name")
            await self.migrate()
            self.channel = channel_name(self.schema)
            self._listener = _Listener(self)
            await self._listener.start()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.stop()
            self._listener = None
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 10)
            except TimeoutError:  # a connection still busy: do not hang the shutdown
                pool.terminate()

    async def migrate(self) -> list[str]:
        """Apply pending migrations under a transaction-level advisory lock, so instances
        starting together apply each migration exactly once."""
        schema = self.schema
        if schema is None or self._pool is None:
            raise StoreError("the store is not open")
        applied = []
        async with self._transaction() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(schema))
            if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", schema):
                await conn.execute(f'CREATE SCHEMA "{schema}"')  # a checked name: [a-z_][a-z0-9_]*
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations"
                " (version text PRIMARY KEY, applied_at double precision NOT NULL)"
            )
            done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
            for migration in migrations.load("postgres"):
                if migration.version in done:
                    continue
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, extract(epoch FROM now()))",
                    migration.version,
                )
                applied.append(migration.version)
        for version in applied:
            log.info("store.migrated", backend="postgresql", schema=schema, version=version)
        return applied

    async def check_ready(self) -> str | None:
        if self._pool is None:
            return "the store is not open"
        try:
            async with self._pool.acquire(timeout=5) as conn:
                current = await conn.fetchval("SELECT max(version) FROM schema_migrations", timeout=5)
        except DRIVER_ERRORS as exc:
            return f"database unavailable: {exc}"
        wanted = migrations.latest("postgres")
        if current != wanted:
            return f"migrations not current (database at {current}, code wants {wanted})"
        return None

    # Plumbing ------------------------------------------------------------------
    def _require_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreError("the store is not open")
        return self._pool

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Any]:
        pool = self._require_pool()
        try:
            async with pool.acquire() as conn, conn.transaction():
                yield conn
        except asyncpg.CharacterNotInRepertoireError as exc:
            # Text PostgreSQL cannot hold (a NUL) that input checks let through: bad input, refused
            # (a 503 would have the client retry for ever). Lookups by such text find nothing first.
            raise InvalidRequest("The request holds text with a NUL character, which cannot be stored.") from exc
        except DRIVER_ERRORS as exc:
            raise StoreError(str(exc)) from exc

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        """A read. A lookup by text PostgreSQL cannot hold (a NUL, e.g. `GET /v1/tasks/%00`) finds
        nothing, as on SQLite: no stored row holds such text, and it is bad input, not an outage."""
        try:
            return list(await self._require_pool().fetch(sql, *args))
        except asyncpg.CharacterNotInRepertoireError:
            return []
        except DRIVER_ERRORS as exc:
            raise StoreError(str(exc)) from exc

    async def _notify(
        self,
        conn: Any,
        *,
        tasks: Sequence[str] = (),
        wake: Iterable[str] = (),
        notices: Sequence[tuple[str, str | None, str]] = (),
    ) -> None:
        """Tell the other instances, on commit, which tasks changed, which workers have work and
        what their watchers should hear of (`notices`: kind, task id, id; see ChangeFeed.notice)."""
        await _Writes().run(conn, self._notification(tasks=tasks, wake=wake, notices=notices))

    def _notification(
        self,
        *,
        tasks: Sequence[str] = (),
        wake: Iterable[str] = (),
        notices: Sequence[tuple[str, str | None, str]] = (),
    ) -> Statement | None:
        """The `pg_notify` statement `_notify` runs (None: nothing to say)."""
        topics = sorted(set(wake))
        if not tasks and not topics and not notices:
            return None
        chunks = [tasks[i : i + _NOTIFY_IDS] for i in range(0, len(tasks), _NOTIFY_IDS)] or [()]
        messages: list[dict[str, Any]] = [{"from": self.instance, "tasks": list(ids), "wake": topics} for ids in chunks]
        if notices:
            messages[0]["notices"] = [list(notice) for notice in notices]
        payloads = [orjson.dumps(message).decode() for message in messages]
        return "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p", (self.channel, payloads)

    def _applied_notification(
        self, applied: Sequence[Applied], *, notices: Sequence[tuple[str, str | None, str]] = ()
    ) -> Statement | None:
        return self._notification(
            tasks=[a.task.id for a in applied if a.transition.changed],
            wake=[topic for a in applied for topic in wakes(a)],
            notices=notices,
        )

    async def _notify_applied(
        self, conn: Any, applied: Sequence[Applied], *, notices: Sequence[tuple[str, str | None, str]] = ()
    ) -> None:
        await _Writes().run(conn, self._applied_notification(applied, notices=notices))

    # Tasks ---------------------------------------------------------------------
    async def create_task(
        self,
        task: Task,
        *,
        idempotency: IdempotencyKey | None = None,
        notify_subscription: Subscription | None = None,
        jobs: Sequence[JobSpec] = (),
        events: Sequence[EventType] = (),
    ) -> CreatedTask:
        topics = ([JOBS] if jobs else []) + ([DELIVERIES] if events else [])
        try:
            async with self._transaction() as conn:
                if idempotency is not None:
                    existing = await _idempotent(conn, idempotency)
                    if existing is not None:
                        return existing
                await conn.execute(_INSERT_TASK, *_values(task_params(task), TASK_COLUMNS))
                if idempotency is not None:
                    taken = await conn.fetchval(
                        "INSERT INTO idempotency_keys (key, fingerprint, task_id, created_at) VALUES ($1, $2, $3, $4)"
                        " ON CONFLICT (key) DO NOTHING RETURNING key",
                        idempotency.key,
                        idempotency.fingerprint,
                        task.id,
                        task.created_at,
                    )
                    if taken is None:  # a concurrent request with the same key committed first
                        raise _KeyTaken
                if notify_subscription is not None:
                    await conn.execute(
                        _INSERT_SUBSCRIPTION, *_values(subscription_params(notify_subscription), SUBSCRIPTION_COLUMNS)
                    )
                for spec in jobs:
                    await _schedule_job(conn, task.id, spec, task.created_at)
                if events:
                    subscribers = await conn.fetch(_TASK_SUBSCRIBERS, task.id)
                    for event_type in events:
                        await _insert_event(conn, event_type, task, task.created_at, subscribers)
                await self._notify(conn, tasks=[task.id], wake=topics)
        except _KeyTaken:
            assert idempotency is not None
            async with self._transaction() as conn:
                existing = await _idempotent(conn, idempotency)
            if existing is None:
                raise StoreError(f"idempotency key {idempotency.key!r} vanished") from None
            return existing
        self.feed.publish(task)
        for topic in topics:
            self.feed.wake(topic)
        return CreatedTask(task, created=True)

    async def get_task(self, task_id: str) -> Task | None:
        rows = await self._fetch("SELECT * FROM tasks WHERE id = $1", task_id)
        return task_from_row(rows[0]) if rows else None

    async def list_tasks(self, query: TaskQuery) -> list[Task]:
        filters = {
            "upstream_task_id": query.upstream_task_id,
            "state": query.state.value if query.state else None,
            "provider": query.provider,
        }
        sql, params = page_query("tasks", filters, query.before_id, query.limit, _numbered)
        return [task_from_row(row) for row in await self._fetch(sql, *params)]

    async def transition(self, task_id: str, decide: Decide) -> Applied:
        async with self._transaction() as conn:
            task = await _lock_task(conn, task_id)
            moment = self.clock()
            applied = await _apply(conn, task, decide(task), moment, lease_for(self.feed, moment))
            await self._notify_applied(conn, [applied])
        return announce(self.feed, applied)

    async def record_callback(
        self, callback: IncomingCallback, report: Report, *, max_callbacks: int | None = None
    ) -> Applied:
        async with self._transaction() as conn:
            # The task's row lock serialises its callbacks, so the duplicate check and the count cannot race;
            # one query (the callbacks_task index) does both.
            task = await _lock_task(conn, callback.task_id)
            logged, duplicate = await conn.fetchrow(
                "SELECT count(*), coalesce(bool_or(body_sha256 = $2), false) FROM callbacks WHERE task_id = $1",
                callback.task_id,
                callback.body_sha256,
            )
            moment = self.clock()
            transition = apply_report(task, report, now=moment, duplicate=duplicate)
            writes = _Writes()  # the task's update, its jobs' removal, the log entry, the notification: one trip
            applied = await _apply(conn, task, transition, moment, lease_for(self.feed, moment), writes)
            if logs_callback(logged, max_callbacks, moved=applied.task.sequence > task.sequence):
                writes.add(_INSERT_CALLBACK, *_values(callback_row(callback, applied, report), CALLBACK_COLUMNS))
            else:
                applied = applied.replace(logged=False)
            notices = [(CALLBACK, callback.task_id, callback.id)]
            await writes.run(conn, self._applied_notification([applied], notices=notices))
        self.feed.notice(CALLBACK, callback.task_id, callback.id)
        return announce(self.feed, applied)

    async def list_callbacks(self, task_id: str) -> list[StoredCallback]:
        rows = await self._fetch("SELECT * FROM callbacks WHERE task_id = $1 ORDER BY received_at, id", task_id)
        return [callback_from_row(row) for row in rows]

    async def tasks_due_for_expiry(self, now: float, limit: int) -> list[str]:
        rows = await self._fetch(
            f"SELECT id FROM tasks WHERE state IN {_OPEN_STATES} AND expires_at <= $1 ORDER BY expires_at LIMIT $2",
            now,
            limit,
        )
        return [row["id"] for row in rows]

    async def expire_tasks(self, now: float, limit: int) -> list[Applied]:
        async with self._transaction() as conn:
            rows = await conn.fetch(_DUE_FOR_EXPIRY, now, limit)
            expired = []
            for task in map(task_from_row, rows):
                expired.append(await _apply(conn, task, expire(task, now=now), now))
            await self._notify_applied(conn, expired)
        return [announce(self.feed, applied) for applied in expired]

    # Subscriptions -------------------------------------------------------------
    async def create_subscription(self, subscription: Subscription) -> Subscription:
        async with self._transaction() as conn:
            await conn.execute(_INSERT_SUBSCRIPTION, *_values(subscription_params(subscription), SUBSCRIPTION_COLUMNS))
        return subscription

    async def get_subscription(self, subscription_id: str) -> Subscription | None:
        rows = await self._fetch("SELECT * FROM subscriptions WHERE id = $1", subscription_id)
        return subscription_from_row(rows[0]) if rows else None

    async def list_subscriptions(self, *, include_task_scoped: bool = False) -> list[Subscription]:
        sql = "SELECT * FROM subscriptions"
        if not include_task_scoped:
            sql += " WHERE task_id IS NULL"
        return [subscription_from_row(row) for row in await self._fetch(sql + " ORDER BY id DESC")]

    async def update_subscription(self, subscription_id: str, **changes: Any) -> Subscription | None:
        check_subscription_changes(changes)
        wake = [DELIVERIES] if changes.get("enabled") else []  # deliveries held while disabled are due again
        async with self._transaction() as conn:
            row = await conn.fetchrow("SELECT * FROM subscriptions WHERE id = $1 FOR UPDATE", subscription_id)
            if row is None:
                return None
            updated = subscription_from_row(row).replace(**changes, updated_at=self.clock())
            row = await conn.fetchrow(
                _UPDATE_SUBSCRIPTION, *_values(subscription_params(updated), SUBSCRIPTION_COLUMNS)
            )
            await self._notify(conn, wake=wake)
        for topic in wake:
            self.feed.wake(topic)
        return subscription_from_row(row)

    async def delete_subscription(self, subscription_id: str) -> bool:
        async with self._transaction() as conn:
            # Pending deliveries of a deleted subscription can never go out: close them.
            # Dropping the lease too means an attempt still in flight cannot make them pending again.
            await conn.execute(
                "UPDATE deliveries SET status = 'failed', next_attempt_at = NULL, lease_owner = NULL,"
                " lease_until = NULL, updated_at = $1 WHERE subscription_id = $2 AND status = 'pending'",
                self.clock(),
                subscription_id,
            )
            status = await conn.execute("DELETE FROM subscriptions WHERE id = $1", subscription_id)
        return _rowcount(status) > 0

    async def emit_event(self, event_type: EventType, data: JSON, *, subscription_id: str | None = None) -> int:
        now = self.clock()
        body = event_body(event_type, data, now=now)
        async with self._transaction() as conn:
            if subscription_id is not None:
                subscribers = await conn.fetch(_ONE_SUBSCRIBER, subscription_id)
            else:
                subscribers = await conn.fetch(_GLOBAL_SUBSCRIBERS)
            count, _ = await _insert_event(
                conn, event_type, None, now, subscribers, body=body, addressed=subscription_id is not None
            )
            await self._notify(conn, wake=[DELIVERIES] if count else [])
        if count:
            self.feed.wake(DELIVERIES)
        return count

    # Deliveries ----------------------------------------------------------------
    async def claim_deliveries(
        self,
        *,
        now: float,
        limit: int,
        owner: str,
        lease_seconds: float,
        exclude_subscriptions: Collection[str] = (),
        per_subscription: int | None = None,
    ) -> list[DeliveryJob]:
        async with self._transaction() as conn:
            rows = await conn.fetch(
                _CLAIM_DELIVERIES,
                owner,
                now + lease_seconds,
                now,
                limit,
                list(exclude_subscriptions),
                max(limit * 4, 64),  # the window of earliest due deliveries ranked per subscription
                per_subscription or limit,
            )
            if not rows:
                return []
            return await _delivery_jobs(conn, rows)

    async def finish_attempt(self, delivery_id: str, owner: str, outcome: AttemptOutcome) -> None:
        final = outcome.status is not DeliveryStatus.PENDING  # a later event of the task may go now
        attempt = outcome.attempt
        async with self._transaction() as conn:
            row = await conn.fetchrow(
                "SELECT lease_owner, subscription_id, task_id FROM deliveries WHERE id = $1 FOR UPDATE", delivery_id
            )
            if row is None:
                return
            await conn.execute(
                "INSERT INTO delivery_attempts (delivery_id, at, status_code, latency_ms, error, response_body)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                delivery_id,
                attempt.at,
                attempt.status_code,
                attempt.latency_ms,
                attempt.error,
                attempt.response_body,
            )
            if row["lease_owner"] == owner:
                await conn.execute(
                    "UPDATE deliveries SET status = $1, attempt_count = attempt_count + 1, next_attempt_at = $2,"
                    " lease_owner = NULL, lease_until = NULL, updated_at = $3 WHERE id = $4",
                    outcome.status.value,
                    outcome.next_attempt_at,
                    attempt.at,
                    delivery_id,
                )
            else:  # the lease was lost: the attempt is on record, the new holder decides
                await conn.execute("UPDATE deliveries SET attempt_count = attempt_count + 1 WHERE id = $1", delivery_id)
            subscription_id = row["subscription_id"]
            if outcome.status is DeliveryStatus.SUCCEEDED:
                await conn.execute(
                    "UPDATE subscriptions SET failing_since = NULL WHERE id = $1 AND failing_since IS NOT NULL",
                    subscription_id,
                )
            else:
                await conn.execute(
                    "UPDATE subscriptions SET failing_since = $1 WHERE id = $2 AND failing_since IS NULL",
                    attempt.at,
                    subscription_id,
                )
            if outcome.disable:
                await conn.execute(
                    "UPDATE subscriptions SET enabled = false, disabled_reason = $1, updated_at = $2 WHERE id = $3",
                    outcome.disable,
                    attempt.at,
                    subscription_id,
                )
            notice = (DELIVERY, row["task_id"], delivery_id)
            await self._notify(conn, wake=[DELIVERIES] if final else [], notices=[notice])
        self.feed.notice(*notice)
        if final:
            self.feed.wake(DELIVERIES)

    async def release_leases(self, owner: str) -> int:
        async with self._transaction() as conn:
            released = 0
            for table in ("deliveries", "jobs"):
                status = await conn.execute(
                    f"UPDATE {table} SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1", owner
                )
                released += _rowcount(status)
            # Handed back at shutdown: the other instances take it over now.
            await self._notify(conn, wake=[DELIVERIES, JOBS] if released else [])
        return released

    async def release_deliveries(self, delivery_ids: Sequence[str], owner: str) -> int:
        if not delivery_ids:
            return 0
        # No wake-up for the other instances: these were more than this instance may send right now,
        # and it takes them again as soon as it can.
        async with self._transaction() as conn:
            status = await conn.execute(
                "UPDATE deliveries SET lease_owner = NULL, lease_until = NULL"
                " WHERE lease_owner = $1 AND id = ANY($2::text[])",
                owner,
                list(delivery_ids),
            )
        return _rowcount(status)

    async def get_delivery(self, delivery_id: str) -> Delivery | None:
        found = await self._deliveries("SELECT * FROM deliveries WHERE id = $1", [delivery_id])
        return found[0] if found else None

    async def list_deliveries(self, query: DeliveryQuery) -> list[Delivery]:
        filters = {
            "subscription_id": query.subscription_id,
            "task_id": query.task_id,
            "status": query.status.value if query.status else None,
        }
        sql, params = page_query("deliveries", filters, query.before_id, query.limit, _numbered)
        return await self._deliveries(sql, params)

    async def _deliveries(self, sql: str, params: Sequence[Any]) -> list[Delivery]:
        rows = await self._fetch(sql, *params)
        if not rows:
            return []
        attempts: dict[str, list[Any]] = {}
        for row in await self._fetch(
            "SELECT * FROM delivery_attempts WHERE delivery_id = ANY($1::text[]) ORDER BY id", [r["id"] for r in rows]
        ):
            attempts.setdefault(row["delivery_id"], []).append(attempt_from_row(row))
        return [delivery_from_row(row, tuple(attempts.get(row["id"], ()))) for row in rows]

    async def retry_delivery(self, delivery_id: str, *, now: float) -> Delivery | None:
        lease = lease_for(self.feed, now)
        job = None
        async with self._transaction() as conn:
            found = await conn.fetchrow(
                "UPDATE deliveries SET status = 'pending', next_attempt_at = $1, lease_owner = NULL,"
                " lease_until = NULL, updated_at = $1 WHERE id = $2 AND status <> 'pending'"
                " AND subscription_id IN (SELECT id FROM subscriptions) RETURNING task_id",
                now,
                delivery_id,
            )
            if found is None:
                return None
            if lease is not None:  # first in line: leased to the local dispatcher, which sends it now
                leased = await conn.fetch(
                    "UPDATE deliveries d SET lease_owner = $1, lease_until = $2 FROM events e"
                    f" WHERE d.id = $3 AND e.id = d.event_id AND {_FIRST_IN_LINE} RETURNING d.*, e.body AS event_body",
                    lease.owner,
                    lease.until,
                    delivery_id,
                )
                job = (await _delivery_jobs(conn, leased))[0] if leased else None
            notice = (DELIVERY, found["task_id"], delivery_id)
            await self._notify(conn, wake=[DELIVERIES], notices=[notice])
        if job is not None:
            self.feed.resend(job)
        else:
            self.feed.wake(DELIVERIES)
        self.feed.notice(*notice)
        return await self.get_delivery(delivery_id)

    async def recover_deliveries(self, subscription_id: str, *, since: float, now: float) -> int:
        async with self._transaction() as conn:
            status = await conn.execute(
                "UPDATE deliveries SET status = 'pending', next_attempt_at = $1, updated_at = $1"
                " WHERE subscription_id = $2 AND status = 'failed' AND created_at >= $3",
                now,
                subscription_id,
                since,
            )
            count = _rowcount(status)
            await self._notify(conn, wake=[DELIVERIES] if count else [])
        if count:
            self.feed.wake(DELIVERIES)
        return count

    async def next_delivery_due(self, *, exclude_subscriptions: Collection[str] = ()) -> float | None:
        rows = await self._fetch(
            "SELECT min(GREATEST(d.next_attempt_at, COALESCE(d.lease_until, d.next_attempt_at))) AS due"
            " FROM deliveries d JOIN subscriptions s ON s.id = d.subscription_id"
            " WHERE d.status = 'pending' AND s.enabled AND NOT (d.subscription_id = ANY($1::text[]))"
            f" AND {_FIRST_IN_LINE}",
            list(exclude_subscriptions),
        )
        due = rows[0]["due"] if rows else None
        return float(due) if due is not None else None

    # Jobs ----------------------------------------------------------------------
    async def schedule_job(self, task_id: str, kind: str, *, run_at: float, payload: JSON) -> Job:
        async with self._transaction() as conn:
            job = await _schedule_job(conn, task_id, JobSpec(kind, run_at, payload), self.clock())
            await self._notify(conn, wake=[JOBS])
        self.feed.wake(JOBS)
        return job

    async def claim_jobs(
        self, kinds: Sequence[str], *, now: float, limit: int, owner: str, lease_seconds: float
    ) -> list[Job]:
        async with self._transaction() as conn:
            rows = await conn.fetch(_CLAIM_JOBS, owner, now + lease_seconds, list(kinds), now, limit)
        return sorted((job_from_row(row) for row in rows), key=lambda job: job.run_at)

    async def finish_job(self, job_id: str, *, reschedule_at: float | None = None, payload: JSON | None = None) -> None:
        async with self._transaction() as conn:
            if reschedule_at is None:
                await conn.execute("DELETE FROM jobs WHERE id = $1", job_id)
                return
            await conn.execute(
                "UPDATE jobs SET run_at = $1, attempts = attempts + 1, payload = COALESCE($2, payload),"
                " lease_owner = NULL, lease_until = NULL WHERE id = $3",
                reschedule_at,
                dumps_optional(payload),
                job_id,
            )

    async def renew_jobs(self, job_ids: Sequence[str], *, owner: str, until: float) -> list[str]:
        if not job_ids:
            return []
        async with self._transaction() as conn:
            rows = await conn.fetch(
                "UPDATE jobs SET lease_until = $1 WHERE lease_owner = $2 AND id = ANY($3::text[]) RETURNING id",
                until,
                owner,
                list(job_ids),
            )
        return [str(row["id"]) for row in rows]

    async def next_job_due(self, kinds: Sequence[str]) -> float | None:
        rows = await self._fetch("SELECT min(run_at) AS due FROM jobs WHERE kind = ANY($1::text[])", list(kinds))
        due = rows[0]["due"] if rows else None
        return float(due) if due is not None else None

    # Counts --------------------------------------------------------------------
    async def counts(self) -> dict[str, Any]:
        tasks = {
            row["state"]: row["n"] for row in await self._fetch("SELECT state, count(*) AS n FROM tasks GROUP BY state")
        }
        pending = await self._fetch("SELECT count(*) AS n FROM deliveries WHERE status = 'pending'")
        jobs = {
            row["kind"]: row["n"] for row in await self._fetch("SELECT kind, count(*) AS n FROM jobs GROUP BY kind")
        }
        return {"tasks": tasks, "pending_deliveries": pending[0]["n"], "jobs": jobs}

    # Notifications from the other instances -------------------------------------
    async def _republish(self, task_ids: Iterable[str]) -> None:
        """Publish the current state of tasks another instance changed, if anyone here listens."""
        everything = self.feed.listener_count(None) or self.feed.watcher_count()
        wanted = [t for t in task_ids if everything or self.feed.listener_count(t)]
        if wanted:
            for row in await self._fetch("SELECT * FROM tasks WHERE id = ANY($1::text[])", wanted):
                self.feed.publish(task_from_row(row))

    async def _catch_up(self, since: float) -> None:
        """After a listener outage: wake every worker and republish what changed meanwhile."""
        self.feed.wake_all()
        rows = await self._fetch(
            "SELECT id FROM tasks WHERE updated_at >= $1 ORDER BY updated_at DESC LIMIT $2",
            since - _CATCH_UP_SLACK,
            _CATCH_UP_LIMIT,
        )
        await self._republish(row["id"] for row in rows)


# --- pieces of transactions ------------------------------------------------------


async def _keep_session(conn: Any) -> None:
    """What the pool runs on a connection given back, besides asyncpg's own rollback of a
    transaction left open: nothing. Pooled connections hold no session state to undo (the
    listener has its own connection, the migration lock is transaction-level, settings are the
    connection's startup ones), so the default reset (RESET ALL, UNLISTEN *, …) was a round trip
    per request for nothing."""


async def _lock_task(conn: Any, task_id: str) -> Task:
    # No stored task has an id PostgreSQL cannot hold (a NUL): not found, as on SQLite.
    row = None if "\x00" in task_id else await conn.fetchrow("SELECT * FROM tasks WHERE id = $1 FOR UPDATE", task_id)
    if row is None:
        raise NotFound(f"No task {task_id}.", code="task_not_found", details={"task_id": task_id})
    return task_from_row(row)


async def _idempotent(conn: Any, idempotency: IdempotencyKey) -> CreatedTask | None:
    row = await conn.fetchrow(
        "SELECT k.fingerprint, t.* FROM idempotency_keys k JOIN tasks t ON t.id = k.task_id WHERE k.key = $1",
        idempotency.key,
    )
    if row is None:
        return None
    return CreatedTask(task_from_row(row), created=False, same_request=row["fingerprint"] == idempotency.fingerprint)


async def _apply(
    conn: Any,
    before: Task,
    transition: Transition,
    now: float,
    lease: Lease | None = None,
    writes: _Writes | None = None,
) -> Applied:
    """Write a transition. The task's update and the removal of its jobs go into `writes` when
    given (the caller runs them, with writes of its own), else they run here, together."""
    new = transition.task
    if new is None:
        return Applied(before, transition)
    pending = writes if writes is not None else _Writes()
    changes = task_changes(before, new)
    if changes:
        pending.add(_update_task_sql(tuple(changes)), new.id, *changes.values())
        # A unique violation means another task already owns that upstream id.
        pending.mismatch = TaskMismatch(before.id, before.upstream_task_id, new.upstream_task_id, taken=True)
    deliveries = 0
    offered: list[DeliveryJob] = []
    if transition.events:
        subscribers = await conn.fetch(_TASK_SUBSCRIBERS, new.id)
        for event_type in transition.events:
            written, leased = await _insert_event(conn, event_type, new, now, subscribers, lease=lease)
            deliveries += written
            offered += leased
    for spec in transition.jobs:
        await _schedule_job(conn, new.id, spec, now)
    kept = jobs_kept(before, transition)
    if kept is not None:  # the jobs just scheduled are of the kinds kept
        pending.add("DELETE FROM jobs WHERE task_id = $1 AND kind <> ALL($2::text[])", new.id, list(kept))
    if writes is None:
        await pending.run(conn)
    return Applied(new, transition, deliveries, tuple(offered))


#: A statement and its arguments.
Statement = tuple[str, Sequence[Any]]
_PLACEHOLDER = re.compile(r"\$(\d+)")


class _Writes:
    """Statements whose results nobody reads, sent as one: each becomes a data-modifying CTE
    (PostgreSQL runs those whether or not anything reads them) of one closing SELECT, so a
    transaction's writes cost one round trip rather than one each. They see the same snapshot,
    so none may depend on another's effect.

        writes = _Writes()
        writes.add("UPDATE tasks SET state = $2 WHERE id = $1", task_id, "succeeded")
        writes.add("DELETE FROM jobs WHERE task_id = $1", task_id)
        await writes.run(conn)   # WITH w0 AS (UPDATE …), w1 AS (DELETE …) SELECT 1
    """

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._args: list[Any] = []
        self.mismatch: TaskMismatch | None = None  # raised for a unique violation of tasks_upstream

    def add(self, sql: str, *args: Any) -> None:
        self._parts.append(_shifted(sql, len(self._args)))
        self._args.extend(args)

    async def run(self, conn: Any, closing: Statement | None = None) -> None:
        """Run them, with `closing` (a SELECT, e.g. the notification) as the statement they precede."""
        parts, args = self._parts, self._args
        if closing is not None:
            last, args = _shifted(closing[0], len(args)), [*args, *closing[1]]
        elif parts:
            last = "SELECT 1"
        else:
            return
        sql = "WITH " + ", ".join(f"w{i} AS ({part})" for i, part in enumerate(parts)) + " " + last if parts else last
        try:
            await conn.execute(sql, *args)
        except asyncpg.UniqueViolationError as exc:
            if self.mismatch is not None and exc.constraint_name == "tasks_upstream":
                raise self.mismatch from exc
            raise


@lru_cache(maxsize=512)
def _shifted(sql: str, offset: int) -> str:
    """`sql` with its placeholders $1, $2, … moved up by `offset`."""
    return _PLACEHOLDER.sub(lambda match: f"${int(match[1]) + offset}", sql) if offset else sql


@lru_cache(maxsize=256)
def _update_task_sql(columns: tuple[str, ...]) -> str:
    """`UPDATE tasks SET <columns> WHERE id = $1`: only what changed, so unchanged indexes rest."""
    return _update("tasks", ("id", *columns))


async def _insert_event(
    conn: Any,
    event_type: EventType,
    task: Task | None,
    now: float,
    subscribers: Iterable[Row],
    *,
    body: bytes | None = None,
    addressed: bool = False,
    lease: Lease | None = None,
) -> tuple[int, list[DeliveryJob]]:
    """Write one event (its body is the task's snapshot unless given) and a delivery per
    subscriber that wants it; an event nobody wants is not written. With a lease, the
    deliveries first in line are leased at once. Returns (deliveries written, those leased)."""
    wanted = wanting(event_type, subscribers, addressed=addressed)
    if not wanted:
        return 0, []
    if body is None:
        assert task is not None
        body = task_event_body(event_type, task, now=now)
    event = new_event(event_type, body, task, now)
    await conn.execute(_INSERT_EVENT, *_values(event.params(), EVENT_COLUMNS))
    rows = delivery_rows(event, wanted)
    offered: list[DeliveryJob] = []
    if lease is not None:
        offered = offer(rows, list(wanted), await _first_in_line(conn, event, rows), lease, body)
    await conn.executemany(_INSERT_DELIVERY, [_values(row, DELIVERY_COLUMNS) for row in rows])
    return len(rows), offered


async def _delivery_jobs(conn: Any, rows: Sequence[Any]) -> list[DeliveryJob]:
    """Delivery rows carrying their event's body (`event_body`) with their subscriptions, as a
    dispatcher sends them."""
    subs = {
        row["id"]: subscription_from_row(row)
        for row in await conn.fetch(
            "SELECT * FROM subscriptions WHERE id = ANY($1::text[])", list({row["subscription_id"] for row in rows})
        )
    }
    return [DeliveryJob(delivery_from_row(row), subs[row["subscription_id"]], bytes(row["event_body"])) for row in rows]


async def _first_in_line(conn: Any, event: EventRow, rows: Sequence[dict[str, Any]]) -> list[bool]:
    """For each of an event's deliveries: no earlier event of the same task is pending for the
    same subscription. One query for all of them (not a round trip per subscriber)."""
    if event.task_id is None:
        return [True] * len(rows)
    waiting = await conn.fetch(
        "SELECT DISTINCT subscription_id FROM deliveries WHERE status = 'pending' AND task_id = $1"
        " AND sequence < $2 AND subscription_id = ANY($3::text[])",
        event.task_id,
        event.sequence,
        [row["subscription_id"] for row in rows],
    )
    behind = {record["subscription_id"] for record in waiting}
    return [row["subscription_id"] not in behind for row in rows]


async def _schedule_job(conn: Any, task_id: str, spec: JobSpec, now: float) -> Job:
    return job_from_row(await conn.fetchrow(_SCHEDULE_JOB, *_values(job_row(task_id, spec, now), JOB_COLUMNS)))


# --- the listener ------------------------------------------------------------------


class _Listener:
    """One connection that LISTENs for the other instances' notifications.

    It reconnects (with backoff) when the connection drops or stops answering;
    after an outage it wakes every worker and republishes recently changed
    tasks, since notifications sent meanwhile are lost. Republishing runs on
    one task, in arrival order, so a listener never sees a task go backwards.
    """

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self.conn: Any = None
        self.reconnects = 0
        self._pending: set[str] = set()
        self._kick = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def pid(self) -> int | None:
        """The server process of the listening connection (None while reconnecting)."""
        return None if self.conn is None or self.conn.is_closed() else int(self.conn.get_server_pid())

    async def start(self) -> None:
        self.conn = await self._connect()  # the first failure is the caller's: open() fails
        self._tasks = [
            asyncio.create_task(self._supervise(), name="receiver-pg-listener"),
            asyncio.create_task(self._republish_loop(), name="receiver-pg-republish"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        conn, self.conn = self.conn, None
        if conn is not None and not conn.is_closed():
            try:
                await conn.remove_listener(self.store.channel, self._on_notification)
                await conn.close(timeout=5)
            except _LINK_ERRORS:
                conn.terminate()

    async def _connect(self) -> Any:
        try:
            conn = await asyncpg.connect(
                self.store._dsn, server_settings=self.store._server_settings("receiver-listener")
            )
        except DRIVER_ERRORS as exc:
            raise StoreError(f"cannot connect to PostgreSQL: {exc}") from exc
        try:
            await conn.add_listener(self.store.channel, self._on_notification)
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def _supervise(self) -> None:
        while True:
            await self._watch(self.conn)
            lost_at = self.store.clock()
            log.warning("store.listener_lost", backend="postgresql", channel=self.store.channel)
            self.conn = None
            backoff = 0.1
            while self.conn is None:
                try:
                    self.conn = await self._connect()
                except Exception as exc:  # whatever stops it, try again: the instance needs to hear the others
                    log.warning("store.listener_retry", backend="postgresql", error=str(exc)[:200], delay=backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
            self.reconnects += 1
            log.info("store.listener_restored", backend="postgresql", channel=self.store.channel)
            try:
                await self.store._catch_up(lost_at)
            except StoreError as exc:
                log.warning("store.catch_up_failed", backend="postgresql", error=str(exc)[:200])
                self.store.feed.wake_all()
            except Exception as exc:  # a bug in the catch-up must not end the watch over the link
                log.error("store.catch_up_failed", backend="postgresql", error=repr(exc)[:200], exc_info=True)
                self.store.feed.wake_all()

    @staticmethod
    async def _watch(conn: Any) -> None:
        """Return once `conn` is closed, or has stopped answering (then close it)."""
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _: lost.set())
        try:
            while not lost.is_set() and not conn.is_closed():
                try:
                    await asyncio.wait_for(lost.wait(), _KEEPALIVE)
                except TimeoutError:  # quiet for a while: make sure the link is still alive
                    await conn.execute("SELECT 1", timeout=5)
        except Exception:  # a broken link, however it shows
            pass
        conn.terminate()

    def _on_notification(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        try:
            message = orjson.loads(payload)
            sender, tasks, topics = message["from"], message["tasks"], message["wake"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("store.notification_garbled", backend="postgresql", channel=channel)
            return
        if sender == self.store.instance:  # published locally already, right after commit
            return
        for topic in topics:
            self.store.feed.wake(topic)
        for notice in message.get("notices", ()):
            with contextlib.suppress(TypeError, ValueError):
                kind, task_id, item_id = notice
                self.store.feed.notice(kind, task_id, item_id)
        if tasks:
            self._pending.update(tasks)
            self._kick.set()

    async def _republish_loop(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            batch, self._pending = self._pending, set()
            try:
                await self.store._republish(batch)
            except StoreError as exc:  # the database is away for a moment: try again shortly
                log.warning("store.republish_failed", backend="postgresql", error=str(exc)[:200])
                self._pending |= batch
                await asyncio.sleep(0.5)
                self._kick.set()
            except Exception as exc:  # one bad batch must not end cross-instance publishing
                log.error("store.republish_failed", backend="postgresql", error=repr(exc)[:200], exc_info=True)
