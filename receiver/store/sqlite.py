"""The embedded SQLite store.

Writes go through one writer connection in its own process (store/writer.py).
Concurrent requests hand it their work as picklable functions of the
connection (the `_…` operations below); it runs everything queued in one
transaction and commits once, then answers them all — group commit, so many
durable writes share one fsync (a piece that fails is undone alone: see
`writer.commit`). Reads use a
separate aiosqlite connection in this process; WAL lets them run beside writes.

    store = SQLiteStore("./data/receiver.db", clock=time.time)
    await store.open()                       # connects and migrates
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import aiosqlite

from receiver.broadcast import CALLBACK, DELIVERY, ChangeFeed
from receiver.clock import system_clock
from receiver.errors import NotFound, StoreError, TaskMismatch
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
    DELIVERY_COLUMNS,
    EVENT_COLUMNS,
    JOB_COLUMNS,
    announce,
    callback_row,
    delivery_rows,
    job_row,
    jobs_kept,
    lease_for,
    logs_callback,
    new_event,
    offer,
    wanting,
)
from receiver.store.rows import (
    SUBSCRIPTION_COLUMNS,
    TASK_COLUMNS,
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
from receiver.store.writer import Op, WriterProcess
from receiver.tasks import JobSpec, Report, Task, Transition, apply_report, expire
from receiver.types import JSON, TERMINAL_STATES, Clock, DeliveryStatus, EventType, TaskState, fields_of

log = get_logger("receiver.store")

_MAX_BATCH = 512
_OPEN_STATES = tuple(s.value for s in TaskState if s not in TERMINAL_STATES)

#: The condition of the partial index `tasks_open_expiry` (migration 0004), word for word: SQLite
#: uses a partial index only for a query whose WHERE repeats its condition. Equalities joined by
#: OR, not `IN (…)`, which SQLite evaluates through a temporary b-tree on every task update.
OPEN_TASK = "(" + " OR ".join(f"state = '{state}'" for state in _OPEN_STATES) + ")"

#: Open tasks whose time is up, soonest first (`?`: now, limit). The states are written out and
#: the index named: with bound states SQLite cannot tell the query stays inside the partial
#: index, and it walked every open task through `tasks_state` and sorted them instead (100 ms of
#: the writer's time every 5 s at 300,000 open tasks).
DUE_FOR_EXPIRY = (
    f"FROM tasks INDEXED BY tasks_open_expiry WHERE {OPEN_TASK} AND expires_at <= ? ORDER BY expires_at LIMIT ?"
)


class SQLiteStore:
    """The embedded default store (see the module docstring)."""

    backend = "sqlite"

    def __init__(self, path: str | Path, *, clock: Clock = system_clock, feed: ChangeFeed | None = None) -> None:
        self.path = str(path)
        self.clock = clock
        self.feed = feed or ChangeFeed()
        self._writer = WriterProcess(self.path)
        self._reader: aiosqlite.Connection | None = None

    @property
    def writer_stats(self) -> tuple[int, int]:
        """(commits, operations) since start: operations / commits is the mean batch size."""
        return self._writer.batches, self._writer.operations

    # Lifecycle -----------------------------------------------------------------
    async def open(self) -> None:
        if self.path != ":memory:":
            folder = Path(self.path).parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
                # A new database is its owner's alone: it holds subscriptions' signing secrets (SQLite
                # gives the -wal and -shm files the database file's permissions).
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
            except OSError as exc:
                raise StoreError(f"cannot create the database in {folder}: {exc.strerror}") from exc
        await self._writer.start()
        await self.migrate()
        self._reader = await aiosqlite.connect(self.path)
        self._reader.row_factory = sqlite3.Row
        await self._reader.execute("PRAGMA busy_timeout=10000")
        await self._reader.execute("PRAGMA query_only=ON")

    async def close(self) -> None:
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        await self._writer.stop()

    async def migrate(self) -> list[str]:
        applied: list[str] = await self._writer.run(_migrate)
        for version in applied:
            log.info("store.migrated", backend="sqlite", version=version)
        return applied

    async def check_ready(self) -> str | None:
        # Reads alone would still answer from the open file while no write can be made.
        if self._writer.broken is not None:
            return f"database unavailable: the SQLite writer is not running ({self._writer.broken})"
        try:
            rows = await self._read("SELECT max(version) AS v FROM schema_migrations")
        except Exception as exc:
            return f"database unavailable: {exc}"
        current = rows[0]["v"] if rows else None
        wanted = migrations.latest("sqlite")
        if current != wanted:
            return f"migrations not current (database at {current}, code wants {wanted})"
        return None

    # Plumbing ------------------------------------------------------------------
    async def _write(self, op: Op) -> Any:
        return await self._writer.run(op)

    async def _read(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        if self._reader is None:
            raise StoreError("the store is not open")
        try:
            # One call on the reader's thread runs the statement to its end: a statement left half-read
            # while another read starts would hold its snapshot, and that read would miss recent commits.
            return list(await self._reader.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc

    def _published(self, applied: Applied) -> Applied:
        return announce(self.feed, applied)

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
        created: CreatedTask = await self._write(
            partial(
                _create_task,
                task=task,
                idempotency=idempotency,
                notify=notify_subscription,
                jobs=jobs,
                events=events,
            )
        )
        if created.created:
            self.feed.publish(created.task)
            if jobs:
                self.feed.wake("jobs")
            if events:
                self.feed.wake("deliveries")
        return created

    async def get_task(self, task_id: str) -> Task | None:
        rows = await self._read("SELECT * FROM tasks WHERE id = ?", (task_id,))
        return task_from_row(rows[0]) if rows else None

    async def list_tasks(self, query: TaskQuery) -> list[Task]:
        filters = {
            "upstream_task_id": query.upstream_task_id,
            "state": query.state.value if query.state else None,
            "provider": query.provider,
        }
        sql, params = page_query("tasks", filters, query.before_id, query.limit)
        return [task_from_row(row) for row in await self._read(sql, params)]

    async def transition(self, task_id: str, decide: Decide) -> Applied:
        now = self.clock()
        applied: Applied = await self._write(
            partial(_transition, task_id=task_id, decide=decide, now=now, lease=lease_for(self.feed, now))
        )
        return self._published(applied)

    async def record_callback(
        self, callback: IncomingCallback, report: Report, *, max_callbacks: int | None = None
    ) -> Applied:
        now = self.clock()
        applied: Applied = await self._write(
            RecordCallback(callback, report, now, lease_for(self.feed, now), max_callbacks)
        )
        self.feed.notice(CALLBACK, callback.task_id, callback.id)
        return self._published(applied)

    async def list_callbacks(self, task_id: str) -> list[StoredCallback]:
        rows = await self._read("SELECT * FROM callbacks WHERE task_id = ? ORDER BY received_at, id", (task_id,))
        return [callback_from_row(row) for row in rows]

    async def tasks_due_for_expiry(self, now: float, limit: int) -> list[str]:
        rows = await self._read("SELECT id " + DUE_FOR_EXPIRY, (now, limit))
        return [row["id"] for row in rows]

    async def expire_tasks(self, now: float, limit: int) -> list[Applied]:
        expired: list[Applied] = await self._write(partial(_expire_tasks, now=now, limit=limit))
        return [self._published(applied) for applied in expired]

    # Subscriptions -------------------------------------------------------------
    async def create_subscription(self, subscription: Subscription) -> Subscription:
        await self._write(partial(_insert_subscription, sub=subscription))
        return subscription

    async def get_subscription(self, subscription_id: str) -> Subscription | None:
        rows = await self._read("SELECT * FROM subscriptions WHERE id = ?", (subscription_id,))
        return subscription_from_row(rows[0]) if rows else None

    async def list_subscriptions(self, *, include_task_scoped: bool = False) -> list[Subscription]:
        sql = "SELECT * FROM subscriptions"
        if not include_task_scoped:
            sql += " WHERE task_id IS NULL"
        rows = await self._read(sql + " ORDER BY id DESC")
        return [subscription_from_row(row) for row in rows]

    async def update_subscription(self, subscription_id: str, **changes: Any) -> Subscription | None:
        check_subscription_changes(changes)
        row: Subscription | None = await self._write(
            partial(_update_subscription, subscription_id=subscription_id, changes=changes, now=self.clock())
        )
        if row is not None and changes.get("enabled"):
            self.feed.wake("deliveries")  # deliveries held while it was disabled are due again
        return row

    async def delete_subscription(self, subscription_id: str) -> bool:
        deleted: bool = await self._write(
            partial(_delete_subscription, subscription_id=subscription_id, now=self.clock())
        )
        return deleted

    async def emit_event(self, event_type: EventType, data: JSON, *, subscription_id: str | None = None) -> int:
        count: int = await self._write(
            partial(_emit_event, event_type=event_type, data=data, subscription_id=subscription_id, now=self.clock())
        )
        if count:
            self.feed.wake("deliveries")
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
        jobs: list[DeliveryJob] = await self._write(
            partial(
                _claim_deliveries,
                now=now,
                limit=limit,
                owner=owner,
                lease_until=now + lease_seconds,
                exclude=tuple(exclude_subscriptions),
                per_subscription=per_subscription or limit,
            )
        )
        return jobs

    async def finish_attempt(self, delivery_id: str, owner: str, outcome: AttemptOutcome) -> None:
        task_id: str | None = await self._write(
            partial(_finish_attempt, delivery_id=delivery_id, owner=owner, outcome=outcome)
        )
        self.feed.notice(DELIVERY, task_id, delivery_id)
        if outcome.status is not DeliveryStatus.PENDING:
            self.feed.wake("deliveries")  # a later event of the same task may be free to go now

    async def release_leases(self, owner: str) -> int:
        count: int = await self._write(partial(_release, owner=owner))
        return count

    async def release_deliveries(self, delivery_ids: Sequence[str], owner: str) -> int:
        if not delivery_ids:
            return 0
        count: int = await self._write(partial(_release_deliveries, delivery_ids=tuple(delivery_ids), owner=owner))
        return count

    async def get_delivery(self, delivery_id: str) -> Delivery | None:
        found = await self._deliveries("SELECT * FROM deliveries WHERE id = ?", (delivery_id,))
        return found[0] if found else None

    async def list_deliveries(self, query: DeliveryQuery) -> list[Delivery]:
        filters = {
            "subscription_id": query.subscription_id,
            "task_id": query.task_id,
            "status": query.status.value if query.status else None,
        }
        sql, params = page_query("deliveries", filters, query.before_id, query.limit)
        return await self._deliveries(sql, params)

    async def _deliveries(self, sql: str, params: Sequence[Any]) -> list[Delivery]:
        rows = await self._read(sql, params)
        if not rows:
            return []
        ids = [row["id"] for row in rows]
        marks = ",".join("?" * len(ids))
        attempts: dict[str, list[Any]] = {}
        for row in await self._read(f"SELECT * FROM delivery_attempts WHERE delivery_id IN ({marks}) ORDER BY id", ids):
            attempts.setdefault(row["delivery_id"], []).append(attempt_from_row(row))
        return [delivery_from_row(row, tuple(attempts.get(row["id"], ()))) for row in rows]

    async def retry_delivery(self, delivery_id: str, *, now: float) -> Delivery | None:
        found, job = await self._write(
            partial(_retry_delivery, delivery_id=delivery_id, now=now, lease=lease_for(self.feed, now))
        )
        if not found:
            return None
        if job is not None:
            self.feed.resend(job)
        else:
            self.feed.wake("deliveries")
        delivery = await self.get_delivery(delivery_id)
        if delivery is not None:
            self.feed.notice(DELIVERY, delivery.task_id, delivery_id)
        return delivery

    async def recover_deliveries(self, subscription_id: str, *, since: float, now: float) -> int:
        count: int = await self._write(
            partial(_recover_deliveries, subscription_id=subscription_id, since=since, now=now)
        )
        if count:
            self.feed.wake("deliveries")
        return count

    async def next_delivery_due(self, *, exclude_subscriptions: Collection[str] = ()) -> float | None:
        excluded = tuple(exclude_subscriptions)
        rows = await self._read(
            "SELECT min(max(d.next_attempt_at, coalesce(d.lease_until, d.next_attempt_at))) AS due"
            " FROM deliveries d JOIN subscriptions s ON s.id = d.subscription_id"
            f" WHERE d.status = 'pending' AND s.enabled = 1 AND {_FIRST_IN_LINE}"
            + _not_in("d.subscription_id", excluded),
            excluded,
        )
        due = rows[0]["due"] if rows else None
        return float(due) if due is not None else None

    # Jobs ----------------------------------------------------------------------
    async def schedule_job(self, task_id: str, kind: str, *, run_at: float, payload: JSON) -> Job:
        job: Job = await self._write(
            partial(_schedule_job, task_id=task_id, spec=JobSpec(kind, run_at, payload), now=self.clock())
        )
        self.feed.wake("jobs")
        return job

    async def claim_jobs(
        self, kinds: Sequence[str], *, now: float, limit: int, owner: str, lease_seconds: float
    ) -> list[Job]:
        jobs: list[Job] = await self._write(
            partial(_claim_jobs, kinds=tuple(kinds), now=now, limit=limit, owner=owner, lease_until=now + lease_seconds)
        )
        return jobs

    async def finish_job(self, job_id: str, *, reschedule_at: float | None = None, payload: JSON | None = None) -> None:
        await self._write(partial(_finish_job, job_id=job_id, reschedule_at=reschedule_at, payload=payload))

    async def renew_jobs(self, job_ids: Sequence[str], *, owner: str, until: float) -> list[str]:
        if not job_ids:
            return []
        held: list[str] = await self._write(partial(_renew_jobs, job_ids=tuple(job_ids), owner=owner, until=until))
        return held

    async def next_job_due(self, kinds: Sequence[str]) -> float | None:
        marks = ",".join("?" * len(kinds))
        rows = await self._read(f"SELECT min(run_at) AS due FROM jobs WHERE kind IN ({marks})", tuple(kinds))
        due = rows[0]["due"] if rows else None
        return float(due) if due is not None else None

    # Counts --------------------------------------------------------------------
    async def counts(self) -> dict[str, Any]:
        tasks = {
            row["state"]: row["n"] for row in await self._read("SELECT state, count(*) AS n FROM tasks GROUP BY state")
        }
        pending = await self._read("SELECT count(*) AS n FROM deliveries WHERE status = 'pending'")
        jobs = {row["kind"]: row["n"] for row in await self._read("SELECT kind, count(*) AS n FROM jobs GROUP BY kind")}
        return {"tasks": tasks, "pending_deliveries": pending[0]["n"], "jobs": jobs}


# --- operations run by the writer process ---------------------------------------


def _statements(sql: str) -> Iterable[str]:
    buffer = ""
    for line in sql.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip():
                yield buffer
            buffer = ""
    if buffer.strip() and not buffer.strip().startswith("--"):
        yield buffer


def _migrate(conn: sqlite3.Connection) -> list[str]:
    conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
    applied = []
    for migration in migrations.load("sqlite"):
        if migration.version in done:
            continue
        for statement in _statements(migration.sql):
            conn.execute(statement)
        conn.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?, strftime('%s','now'))",
            (migration.version,),
        )
        applied.append(migration.version)
    return applied


def _load_task(conn: sqlite3.Connection, task_id: str) -> Task:
    row = conn.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
    if row is None:
        raise NotFound(f"No task {task_id}.", code="task_not_found", details={"task_id": task_id})
    return task_from_row(row)


def _insert(table: str, columns: Sequence[str]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(':' + c for c in columns)})"


_INSERT_TASK = _insert("tasks", TASK_COLUMNS)
_INSERT_SUBSCRIPTION = _insert("subscriptions", SUBSCRIPTION_COLUMNS)
_INSERT_EVENT = _insert("events", EVENT_COLUMNS)
_INSERT_DELIVERY = _insert("deliveries", DELIVERY_COLUMNS)
_INSERT_CALLBACK = _insert("callbacks", CALLBACK_COLUMNS)
_INSERT_JOB = _insert("jobs", JOB_COLUMNS)


def _create_task(
    conn: sqlite3.Connection,
    *,
    task: Task,
    idempotency: IdempotencyKey | None,
    notify: Subscription | None,
    jobs: Sequence[JobSpec],
    events: Sequence[EventType],
) -> CreatedTask:
    if idempotency is not None:
        row = conn.execute(
            "SELECT fingerprint, task_id FROM idempotency_keys WHERE key = ?", (idempotency.key,)
        ).fetchone()
        if row is not None:
            existing = _load_task(conn, row["task_id"])
            return CreatedTask(existing, created=False, same_request=row["fingerprint"] == idempotency.fingerprint)
    conn.execute(_INSERT_TASK, task_params(task))
    if idempotency is not None:
        conn.execute(
            "INSERT INTO idempotency_keys (key, fingerprint, task_id, created_at) VALUES (?, ?, ?, ?)",
            (idempotency.key, idempotency.fingerprint, task.id, task.created_at),
        )
    if notify is not None:
        _insert_subscription(conn, sub=notify)
    for spec in jobs:
        _schedule_job(conn, task_id=task.id, spec=spec, now=task.created_at)
    if events:
        subscribers = _subscribers(conn, task.id)
        for event_type in events:
            _insert_event(conn, event_type, task, task.created_at, subscribers)
    return CreatedTask(task, created=True)


def _apply(
    conn: sqlite3.Connection, before: Task, transition: Transition, now: float, lease: Lease | None = None
) -> Applied:
    new = transition.task
    if new is None:
        return Applied(before, transition)
    changes = task_changes(before, new)
    if changes:
        try:
            conn.execute(_update_task_sql(tuple(changes)), {**changes, "id": new.id})
        except sqlite3.IntegrityError as exc:  # another task already owns that upstream id
            raise TaskMismatch(before.id, before.upstream_task_id, new.upstream_task_id, taken=True) from exc
    deliveries = 0
    offered: list[DeliveryJob] = []
    if transition.events:
        subscribers = _subscribers(conn, new.id)
        for event_type in transition.events:
            written, leased = _insert_event(conn, event_type, new, now, subscribers, lease=lease)
            deliveries += written
            offered += leased
    kept = jobs_kept(before, transition)
    if kept is not None:
        conn.execute(delete_jobs_sql(len(kept)), (new.id, *kept))
    for spec in transition.jobs:
        _schedule_job(conn, task_id=new.id, spec=spec, now=now)
    return Applied(new, transition, deliveries, tuple(offered))


@lru_cache(maxsize=16)
def delete_jobs_sql(kept: int) -> str:
    """Delete a task's jobs but for `kept` kinds (`?`: the task id, then the kinds)."""
    sql = "DELETE FROM jobs WHERE task_id = ?"
    return sql + f" AND kind NOT IN ({','.join('?' * kept)})" if kept else sql


@lru_cache(maxsize=256)
def _update_task_sql(columns: tuple[str, ...]) -> str:
    return "UPDATE tasks SET " + ", ".join(f"{c} = :{c}" for c in columns) + " WHERE id = :id"


def _subscribers(conn: sqlite3.Connection, task_id: str | None) -> list[sqlite3.Row]:
    """The enabled subscriptions that may want a task's events (all of them, and its own)."""
    if task_id is None:
        return conn.execute("SELECT * FROM subscriptions WHERE enabled = 1 AND task_id IS NULL").fetchall()
    return conn.execute(
        "SELECT * FROM subscriptions WHERE enabled = 1 AND (task_id IS NULL OR task_id = ?)", (task_id,)
    ).fetchall()


def _insert_event(
    conn: sqlite3.Connection,
    event_type: EventType,
    task: Task | None,
    now: float,
    subscribers: list[sqlite3.Row],
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
    conn.execute(_INSERT_EVENT, event.params())
    deliveries = delivery_rows(event, wanted)
    offered: list[DeliveryJob] = []
    if lease is not None:
        first = [_first_in_line(conn, row) for row in deliveries]
        offered = offer(deliveries, wanted, first, lease, body)
    conn.executemany(_INSERT_DELIVERY, deliveries)
    return len(deliveries), offered


def _first_in_line(conn: sqlite3.Connection, row: dict[str, Any]) -> bool:
    """No earlier event of the same task is pending for the same subscription."""
    if row["task_id"] is None:
        return True
    earlier = conn.execute(
        "SELECT 1 FROM deliveries WHERE status = 'pending' AND subscription_id = ? AND task_id = ? AND sequence < ?"
        " LIMIT 1",
        (row["subscription_id"], row["task_id"], row["sequence"]),
    ).fetchone()
    return earlier is None


def _transition(
    conn: sqlite3.Connection, *, task_id: str, decide: Decide, now: float, lease: Lease | None = None
) -> Applied:
    task = _load_task(conn, task_id)
    return _apply(conn, task, decide(task), now, lease)


def _record_callback(
    conn: sqlite3.Connection,
    *,
    callback: IncomingCallback,
    report: Report,
    now: float,
    lease: Lease | None = None,
    max_callbacks: int | None = None,
) -> Applied:
    task = _load_task(conn, callback.task_id)
    # One query (the callbacks_task index) both counts the task's log and finds a duplicate.
    logged, seen = conn.execute(
        "SELECT count(*), coalesce(max(body_sha256 = ?), 0) FROM callbacks WHERE task_id = ?",
        (callback.body_sha256, callback.task_id),
    ).fetchone()
    applied = _apply(conn, task, apply_report(task, report, now=now, duplicate=bool(seen)), now, lease)
    if not logs_callback(logged, max_callbacks, moved=applied.task.sequence > task.sequence):
        return applied.replace(logged=False)
    conn.execute(_INSERT_CALLBACK, callback_row(callback, applied, report))
    return applied


@dataclass(frozen=True, slots=True)
class RecordCallback:
    """`_record_callback` as the writer's operation. One crosses to the writer per callback, so it
    pickles flat, the callback and the report as their fields, rather than as a partial holding a
    tree of values (bench/README.md)."""

    callback: IncomingCallback
    report: Report
    now: float
    lease: Lease | None
    max_callbacks: int | None

    def __call__(self, conn: sqlite3.Connection) -> Applied:
        return _record_callback(
            conn,
            callback=self.callback,
            report=self.report,
            now=self.now,
            lease=self.lease,
            max_callbacks=self.max_callbacks,
        )

    def __reduce__(self) -> tuple[Any, ...]:
        lease = None if self.lease is None else fields_of(self.lease)
        return (
            _record_callback_op,
            (fields_of(self.callback), fields_of(self.report), self.now, lease, self.max_callbacks),
        )


def _record_callback_op(
    callback: tuple[Any, ...],
    report: tuple[Any, ...],
    now: float,
    lease: tuple[Any, ...] | None,
    max_callbacks: int | None,
) -> RecordCallback:
    return RecordCallback(
        IncomingCallback(*callback), Report(*report), now, None if lease is None else Lease(*lease), max_callbacks
    )


def _expire_tasks(conn: sqlite3.Connection, *, now: float, limit: int) -> list[Applied]:
    # One writer: nobody else can be expiring these tasks at the same time.
    rows = conn.execute("SELECT * " + DUE_FOR_EXPIRY, (now, limit)).fetchall()
    return [_apply(conn, task, expire(task, now=now), now) for task in map(task_from_row, rows)]


def _insert_subscription(conn: sqlite3.Connection, *, sub: Subscription) -> None:
    conn.execute(_INSERT_SUBSCRIPTION, subscription_params(sub))


def _update_subscription(
    conn: sqlite3.Connection, *, subscription_id: str, changes: dict[str, Any], now: float
) -> Subscription | None:
    row = conn.execute("SELECT * FROM subscriptions WHERE id = ?", (subscription_id,)).fetchone()
    if row is None:
        return None
    updated = subscription_from_row(row).replace(**changes, updated_at=now)
    params = subscription_params(updated)
    sets = ", ".join(f"{c} = :{c}" for c in SUBSCRIPTION_COLUMNS if c != "id")
    conn.execute(f"UPDATE subscriptions SET {sets} WHERE id = :id", params)
    return subscription_from_row(
        conn.execute("SELECT * FROM subscriptions WHERE id = ?", (subscription_id,)).fetchone()
    )


def _delete_subscription(conn: sqlite3.Connection, *, subscription_id: str, now: float) -> bool:
    # Pending deliveries of a deleted subscription can never go out: close them.
    # Dropping the lease too means an attempt still in flight cannot make them pending again.
    conn.execute(
        "UPDATE deliveries SET status = 'failed', next_attempt_at = NULL, lease_owner = NULL, lease_until = NULL,"
        " updated_at = ? WHERE subscription_id = ? AND status = 'pending'",
        (now, subscription_id),
    )
    return conn.execute("DELETE FROM subscriptions WHERE id = ?", (subscription_id,)).rowcount > 0


def _emit_event(
    conn: sqlite3.Connection, *, event_type: EventType, data: JSON, subscription_id: str | None, now: float
) -> int:
    if subscription_id is not None:
        subscribers = conn.execute("SELECT * FROM subscriptions WHERE id = ?", (subscription_id,)).fetchall()
    else:
        subscribers = _subscribers(conn, None)
    body = event_body(event_type, data, now=now)
    written, _ = _insert_event(
        conn, event_type, None, now, subscribers, body=body, addressed=subscription_id is not None
    )
    return written


# A pending delivery waits while an earlier event of its subscription and task is pending.
_FIRST_IN_LINE = """NOT EXISTS (
           SELECT 1 FROM deliveries p
            WHERE p.status = 'pending' AND p.subscription_id = d.subscription_id
              AND p.task_id = d.task_id AND p.sequence < d.sequence)"""

_CLAIMABLE = f"""
    SELECT d.id, d.subscription_id, d.next_attempt_at FROM deliveries d JOIN subscriptions s ON s.id = d.subscription_id
     WHERE d.status = 'pending' AND d.next_attempt_at <= ?
       AND (d.lease_until IS NULL OR d.lease_until < ?)
       AND s.enabled = 1
       AND {_FIRST_IN_LINE}"""


def _not_in(column: str, values: Sequence[Any]) -> str:
    return f" AND {column} NOT IN ({','.join('?' * len(values))})" if values else ""


def _claim_deliveries(
    conn: sqlite3.Connection,
    *,
    now: float,
    limit: int,
    owner: str,
    lease_until: float,
    exclude: tuple[str, ...],
    per_subscription: int,
) -> list[DeliveryJob]:
    # The earliest due deliveries (a bounded window), at most `per_subscription` of each subscription.
    due = _CLAIMABLE + _not_in("d.subscription_id", exclude) + " ORDER BY d.next_attempt_at, d.id LIMIT ?"
    sql = (
        "SELECT id FROM (SELECT id, next_attempt_at, ROW_NUMBER() OVER"
        f" (PARTITION BY subscription_id ORDER BY next_attempt_at, id) AS rank FROM ({due}))"
        " WHERE rank <= ? ORDER BY next_attempt_at, id LIMIT ?"
    )
    window = max(limit * 4, 64)
    ids = [row["id"] for row in conn.execute(sql, (now, now, *exclude, window, per_subscription, limit))]
    if not ids:
        return []
    marks = ",".join("?" * len(ids))
    conn.execute(
        f"UPDATE deliveries SET lease_owner = ?, lease_until = ? WHERE id IN ({marks})", (owner, lease_until, *ids)
    )
    return _delivery_jobs(conn, ids)


def _delivery_jobs(conn: sqlite3.Connection, ids: Sequence[str]) -> list[DeliveryJob]:
    """The deliveries `ids` with their subscriptions and event bodies, as a dispatcher sends them."""
    marks = ",".join("?" * len(ids))
    rows = conn.execute(
        f"SELECT d.*, e.body AS event_body FROM deliveries d JOIN events e ON e.id = d.event_id"
        f" WHERE d.id IN ({marks}) ORDER BY d.next_attempt_at, d.id",
        ids,
    ).fetchall()
    subs = {
        row["id"]: subscription_from_row(row)
        for row in conn.execute(
            f"SELECT * FROM subscriptions WHERE id IN ({','.join('?' * len(rows))})",
            [row["subscription_id"] for row in rows],
        )
    }
    return [DeliveryJob(delivery_from_row(row), subs[row["subscription_id"]], bytes(row["event_body"])) for row in rows]


def _finish_attempt(conn: sqlite3.Connection, *, delivery_id: str, owner: str, outcome: AttemptOutcome) -> str | None:
    """Returns the delivery's task (None: no such delivery, or one not tied to a task)."""
    row = conn.execute(
        "SELECT lease_owner, subscription_id, task_id FROM deliveries WHERE id = ?", (delivery_id,)
    ).fetchone()
    if row is None:
        return None
    attempt = outcome.attempt
    conn.execute(
        "INSERT INTO delivery_attempts (delivery_id, at, status_code, latency_ms, error, response_body)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (delivery_id, attempt.at, attempt.status_code, attempt.latency_ms, attempt.error, attempt.response_body),
    )
    if row["lease_owner"] == owner:
        conn.execute(
            "UPDATE deliveries SET status = ?, attempt_count = attempt_count + 1, next_attempt_at = ?,"
            " lease_owner = NULL, lease_until = NULL, updated_at = ? WHERE id = ?",
            (outcome.status.value, outcome.next_attempt_at, attempt.at, delivery_id),
        )
    else:
        conn.execute("UPDATE deliveries SET attempt_count = attempt_count + 1 WHERE id = ?", (delivery_id,))
    if outcome.status is DeliveryStatus.SUCCEEDED:
        conn.execute(
            "UPDATE subscriptions SET failing_since = NULL WHERE id = ? AND failing_since IS NOT NULL",
            (row["subscription_id"],),
        )
    else:
        conn.execute(
            "UPDATE subscriptions SET failing_since = ? WHERE id = ? AND failing_since IS NULL",
            (attempt.at, row["subscription_id"]),
        )
    if outcome.disable:
        conn.execute(
            "UPDATE subscriptions SET enabled = 0, disabled_reason = ?, updated_at = ? WHERE id = ?",
            (outcome.disable, attempt.at, row["subscription_id"]),
        )
    task_id: str | None = row["task_id"]
    return task_id


def _release(conn: sqlite3.Connection, *, owner: str) -> int:
    released = 0
    for table in ("deliveries", "jobs"):
        released += conn.execute(
            f"UPDATE {table} SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ?", (owner,)
        ).rowcount
    return released


def _release_deliveries(conn: sqlite3.Connection, *, delivery_ids: tuple[str, ...], owner: str) -> int:
    marks = ",".join("?" * len(delivery_ids))
    return conn.execute(
        f"UPDATE deliveries SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ? AND id IN ({marks})",
        (owner, *delivery_ids),
    ).rowcount


def _retry_delivery(
    conn: sqlite3.Connection, *, delivery_id: str, now: float, lease: Lease | None = None
) -> tuple[bool, DeliveryJob | None]:
    """Make the delivery pending, due now; with a lease, lease it at once when it is first in line
    (returned, for the local dispatcher to send now). Returns (found, the leased delivery); not
    found also when its subscription was deleted meanwhile (it could never go out), or when it is
    pending already (a retry racing another: the first one sends it, once)."""
    found = (
        conn.execute(
            "UPDATE deliveries SET status = 'pending', next_attempt_at = ?, lease_owner = NULL, lease_until = NULL,"
            " updated_at = ? WHERE id = ? AND status <> 'pending'"
            " AND subscription_id IN (SELECT id FROM subscriptions)",
            (now, now, delivery_id),
        ).rowcount
        > 0
    )
    if not found or lease is None:
        return found, None
    leased = conn.execute(
        f"UPDATE deliveries AS d SET lease_owner = ?, lease_until = ? WHERE d.id = ? AND {_FIRST_IN_LINE}",
        (lease.owner, lease.until, delivery_id),
    ).rowcount
    return True, _delivery_jobs(conn, [delivery_id])[0] if leased else None


def _recover_deliveries(conn: sqlite3.Connection, *, subscription_id: str, since: float, now: float) -> int:
    return conn.execute(
        "UPDATE deliveries SET status = 'pending', next_attempt_at = ?, updated_at = ?"
        " WHERE subscription_id = ? AND status = 'failed' AND created_at >= ?",
        (now, now, subscription_id, since),
    ).rowcount


def _schedule_job(conn: sqlite3.Connection, *, task_id: str, spec: JobSpec, now: float) -> Job:
    conn.execute(
        _INSERT_JOB + " ON CONFLICT (kind, task_id) DO UPDATE SET run_at = excluded.run_at,"
        " payload = excluded.payload, lease_owner = NULL, lease_until = NULL",
        job_row(task_id, spec, now),
    )
    row = conn.execute("SELECT * FROM jobs WHERE kind = ? AND task_id = ?", (spec.kind, task_id)).fetchone()
    return job_from_row(row)


def _claim_jobs(
    conn: sqlite3.Connection, *, kinds: tuple[str, ...], now: float, limit: int, owner: str, lease_until: float
) -> list[Job]:
    marks = ",".join("?" * len(kinds))
    rows = conn.execute(
        f"UPDATE jobs SET lease_owner = ?, lease_until = ? WHERE id IN ("
        f" SELECT id FROM jobs WHERE kind IN ({marks}) AND run_at <= ?"
        f" AND (lease_until IS NULL OR lease_until < ?) ORDER BY run_at LIMIT ?) RETURNING *",
        (owner, lease_until, *kinds, now, now, limit),
    ).fetchall()
    return sorted((job_from_row(row) for row in rows), key=lambda job: job.run_at)


def _renew_jobs(conn: sqlite3.Connection, *, job_ids: tuple[str, ...], owner: str, until: float) -> list[str]:
    marks = ",".join("?" * len(job_ids))
    rows = conn.execute(
        f"UPDATE jobs SET lease_until = ? WHERE lease_owner = ? AND id IN ({marks}) RETURNING id",
        (until, owner, *job_ids),
    ).fetchall()
    return [str(row["id"]) for row in rows]


def _finish_job(conn: sqlite3.Connection, *, job_id: str, reschedule_at: float | None, payload: JSON | None) -> None:
    if reschedule_at is None:
        conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return
    conn.execute(
        "UPDATE jobs SET run_at = ?, attempts = attempts + 1, payload = COALESCE(?, payload),"
        " lease_owner = NULL, lease_until = NULL WHERE id = ?",
        (reschedule_at, dumps_optional(payload), job_id),
    )
