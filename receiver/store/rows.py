"""Row <-> value-object mapping shared by every backend.

Rows are anything indexable by column name (sqlite3.Row, asyncpg.Record);
JSON columns hold text in every backend.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import orjson

from receiver.store.base import Attempt, Delivery, Job, StoredCallback, Subscription
from receiver.tasks import Task
from receiver.types import DeliveryStatus, TaskState, Verdict, fields_of


class Row(Protocol):
    """A database row: sqlite3.Row, asyncpg.Record or a dict."""

    def __getitem__(self, key: str, /) -> Any: ...


TASK_COLUMNS = (
    "id",
    "provider",
    "model",
    "state",
    "upstream_task_id",
    "request",
    "result",
    "error",
    "metadata",
    "sequence",
    "notify_url",
    "warnings",
    "origin",
    "created_at",
    "updated_at",
    "completed_at",
    "expires_at",
)

SUBSCRIPTION_COLUMNS = (
    "id",
    "url",
    "events",
    "description",
    "secret",
    "previous_secret",
    "previous_secret_expires_at",
    "enabled",
    "disabled_reason",
    "failing_since",
    "task_id",
    "uses_notify_secret",
    "created_at",
    "updated_at",
)


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _loads(value: str | bytes | None) -> Any:
    return None if value is None else orjson.loads(value)


def dumps_optional(value: Any) -> str | None:
    """`dumps`, keeping None a NULL."""
    return None if value is None else dumps(value)


#: How each column of `tasks` is written from a Task's field of the same name.
_TASK_ENCODERS: dict[str, Callable[[Any], Any]] = {
    "state": lambda state: state.value,
    "request": dumps,
    "result": dumps_optional,
    "error": dumps_optional,
    "metadata": dumps,
    "warnings": lambda warnings: dumps(list(warnings)),
}


#: The Task's fields in their order (`fields_of`), which are the table's columns.
_TASK_FIELDS = tuple(Task.__dataclass_fields__)


def task_params(task: Task) -> dict[str, Any]:
    params = dict(zip(_TASK_FIELDS, fields_of(task), strict=True))
    for column, encode in _TASK_ENCODERS.items():
        params[column] = encode(params[column])
    return params


def task_changes(before: Task, after: Task) -> dict[str, Any]:
    """The columns (encoded as task_params encodes them) that differ between two versions of a
    task. Updating only these leaves the indexes on unchanged columns alone; only these are
    encoded (a callback's write changes five of the seventeen)."""
    changes = {}
    for column, old, new in zip(_TASK_FIELDS, fields_of(before), fields_of(after), strict=True):
        if old is not new and old != new and column != "id":  # the row is found by its id
            encode = _TASK_ENCODERS.get(column)
            changes[column] = new if encode is None else encode(new)
    return changes


def task_from_row(row: Row) -> Task:
    return Task(
        id=row["id"],
        provider=row["provider"],
        model=row["model"],
        state=TaskState(row["state"]),
        upstream_task_id=row["upstream_task_id"],
        request=_loads(row["request"]),
        result=_loads(row["result"]),
        error=_loads(row["error"]),
        metadata=_loads(row["metadata"]),
        sequence=row["sequence"],
        notify_url=row["notify_url"],
        warnings=tuple(_loads(row["warnings"])),
        origin=row["origin"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        completed_at=row["completed_at"],
        expires_at=row["expires_at"],
    )


def callback_from_row(row: Row) -> StoredCallback:
    return StoredCallback(
        id=row["id"],
        task_id=row["task_id"],
        received_at=row["received_at"],
        body=bytes(row["body"]),
        headers=_loads(row["headers"]),
        verdict=Verdict(row["verdict"]),
        reason=row["reason"],
        dialect=row["dialect"],
        reported_state=row["reported_state"],
        provider_signature=row["provider_signature"],
    )


def subscription_params(sub: Subscription) -> dict[str, Any]:
    return {
        "id": sub.id,
        "url": sub.url,
        "events": dumps(list(sub.events)),
        "description": sub.description,
        "secret": sub.secret,
        "previous_secret": sub.previous_secret,
        "previous_secret_expires_at": sub.previous_secret_expires_at,
        "enabled": sub.enabled,
        "disabled_reason": sub.disabled_reason,
        "failing_since": sub.failing_since,
        "task_id": sub.task_id,
        "uses_notify_secret": sub.uses_notify_secret,
        "created_at": sub.created_at,
        "updated_at": sub.updated_at,
    }


def check_subscription_changes(changes: Mapping[str, Any]) -> None:
    """`update_subscription`'s changes name columns, never anything else (ValueError)."""
    unknown = set(changes) - set(SUBSCRIPTION_COLUMNS)
    if unknown:
        raise ValueError(f"unknown subscription fields: {sorted(unknown)}")


def subscription_from_row(row: Row) -> Subscription:
    return Subscription(
        id=row["id"],
        url=row["url"],
        events=tuple(_loads(row["events"])),
        description=row["description"],
        secret=row["secret"],
        previous_secret=row["previous_secret"],
        previous_secret_expires_at=row["previous_secret_expires_at"],
        enabled=bool(row["enabled"]),
        disabled_reason=row["disabled_reason"],
        failing_since=row["failing_since"],
        task_id=row["task_id"],
        uses_notify_secret=bool(row["uses_notify_secret"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def attempt_from_row(row: Row) -> Attempt:
    return Attempt(
        at=row["at"],
        status_code=row["status_code"],
        latency_ms=row["latency_ms"],
        error=row["error"],
        response_body=row["response_body"],
    )


def delivery_from_row(row: Row, attempts: tuple[Attempt, ...] = ()) -> Delivery:
    return Delivery(
        id=row["id"],
        event_id=row["event_id"],
        subscription_id=row["subscription_id"],
        task_id=row["task_id"],
        event_type=row["event_type"],
        sequence=row["sequence"],
        status=DeliveryStatus(row["status"]),
        attempt_count=row["attempt_count"],
        next_attempt_at=row["next_attempt_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        attempts=attempts,
    )


def job_from_row(row: Row) -> Job:
    return Job(
        id=row["id"],
        kind=row["kind"],
        task_id=row["task_id"],
        run_at=row["run_at"],
        attempts=row["attempts"],
        payload=_loads(row["payload"]),
    )


def page_query(
    table: str,
    filters: Mapping[str, Any],
    before_id: str | None,
    limit: int,
    placeholder: Callable[[int], str] = lambda n: "?",
) -> tuple[str, list[Any]]:
    """`SELECT * FROM table` where each given filter equals its value, newest first (ids sort by
    creation time), after the cursor `before_id`; `placeholder(n)` writes the n-th parameter
    (`?` for SQLite, `$n` for PostgreSQL)."""
    where: list[str] = []
    params: list[Any] = []

    def add(condition: str, value: Any) -> None:
        params.append(value)
        where.append(f"{condition} {placeholder(len(params))}")

    for column, value in filters.items():
        if value is not None:
            add(f"{column} =", value)
    if before_id:
        add("id <", before_id)
    params.append(limit)
    sql = f"SELECT * FROM {table}" + (" WHERE " + " AND ".join(where) if where else "")
    return f"{sql} ORDER BY id DESC LIMIT {placeholder(len(params))}", params
