"""What a committed change writes besides the task, and whom it wakes.

Pure pieces shared by every backend, so SQLite and PostgreSQL decide the same
and write the same rows for the same change, and only the SQL differs:

    wanted = wanting(EventType.SUCCEEDED, subscribers)  # the subscriptions that want it
    event = new_event(EventType.SUCCEEDED, body, task, now)
    rows = delivery_rows(event, wanted)             # a pending delivery for each
    kept = jobs_kept(before, transition)            # None: leave the task's jobs alone
    logs_callback(logged, max_callbacks)           # one more row for the task's callback log?
    lease = lease_for(feed, now)                    # deliveries leased at once to the local dispatcher
    announce(feed, applied)                         # after commit: publish + wake workers
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from receiver.broadcast import ChangeFeed
from receiver.events import matches
from receiver.ids import new_id
from receiver.store.base import Applied, DeliveryJob, IncomingCallback, Lease
from receiver.store.rows import Row, delivery_from_row, dumps, subscription_from_row
from receiver.tasks import JobSpec, Report, Task, Transition
from receiver.types import DeliveryStatus, EventType

#: The worker topics a committed change can wake (ChangeFeed.wake).
DELIVERIES = "deliveries"
JOBS = "jobs"

#: The columns each builder fills, in the order backends list them in their INSERTs.
EVENT_COLUMNS = ("id", "task_id", "type", "sequence", "body", "created_at")
DELIVERY_COLUMNS = (
    "id",
    "event_id",
    "subscription_id",
    "task_id",
    "event_type",
    "sequence",
    "status",
    "attempt_count",
    "next_attempt_at",
    "created_at",
    "updated_at",
    "lease_owner",
    "lease_until",
)
CALLBACK_COLUMNS = (
    "id",
    "task_id",
    "received_at",
    "body",
    "headers",
    "body_sha256",
    "verdict",
    "reason",
    "dialect",
    "reported_state",
    "provider_signature",
)
JOB_COLUMNS = ("id", "kind", "task_id", "run_at", "attempts", "payload", "created_at")


@dataclass(frozen=True, slots=True)
class EventRow:
    """One row of `events`: the body is built once and sent byte for byte on every attempt."""

    id: str
    task_id: str | None
    type: str
    sequence: int
    body: bytes
    created_at: float

    def params(self) -> dict[str, Any]:
        # Spelled out: dataclasses.asdict deep-copies every field, and this runs once per event.
        return {
            "id": self.id,
            "task_id": self.task_id,
            "type": self.type,
            "sequence": self.sequence,
            "body": self.body,
            "created_at": self.created_at,
        }


def new_event(event_type: EventType, body: bytes, task: Task | None, now: float) -> EventRow:
    return EventRow(
        id=new_id("evt"),
        task_id=task.id if task else None,
        type=event_type.value,
        sequence=task.sequence if task else 0,
        body=body,
        created_at=now,
    )


def wanting(event_type: EventType, subscribers: Iterable[Row], *, addressed: bool = False) -> list[Row]:
    """The subscribers (rows with `id`, `events`) whose filter takes the event; `addressed`: the
    event names its subscription, no filter applies. An event nobody wants is not written: the
    events table is the outbox's, and its bodies are only ever read by deliveries."""
    return [row for row in subscribers if addressed or matches(tuple(_filters(row["events"])), event_type.value)]


def delivery_rows(event: EventRow, subscribers: Iterable[Row]) -> list[dict[str, Any]]:
    """A pending delivery, due at once, for each subscriber (rows with `id`): those `wanting`
    chose, so the filters are read once per event."""
    return [
        {
            "id": new_id("dlv"),
            "event_id": event.id,
            "subscription_id": row["id"],
            "task_id": event.task_id,
            "event_type": event.type,
            "sequence": event.sequence,
            "status": DeliveryStatus.PENDING.value,
            "attempt_count": 0,
            "next_attempt_at": event.created_at,
            "created_at": event.created_at,
            "updated_at": event.created_at,
            "lease_owner": None,
            "lease_until": None,
        }
        for row in subscribers
    ]


def offer(
    rows: list[dict[str, Any]], subscribers: list[Row], first_in_line: list[bool], lease: Lease, body: bytes
) -> list[DeliveryJob]:
    """Lease the deliveries that are first in line for their endpoint (no earlier event of their
    task is pending for that subscription) and build the jobs the local dispatcher gets after
    commit. `rows` and `subscribers` (full subscription rows) go together, in order."""
    offered = []
    for row, subscriber, first in zip(rows, subscribers, first_in_line, strict=True):
        if not first:
            continue
        row["lease_owner"], row["lease_until"] = lease.owner, lease.until
        offered.append(DeliveryJob(delivery_from_row(row), subscription_from_row(subscriber), body))
    return offered


def _filters(events: str | bytes) -> list[str]:
    loaded: list[str] = orjson.loads(events)
    return loaded


def jobs_kept(before: Task, transition: Transition) -> tuple[str, ...] | None:
    """When a task turns terminal its other jobs are dropped: the job kinds to keep, or
    None when the task's jobs stay as they are."""
    new = transition.task
    if new is None or not new.terminal or before.terminal:
        return None
    return tuple(spec.kind for spec in transition.jobs)


def job_row(task_id: str, spec: JobSpec, now: float) -> dict[str, Any]:
    return {
        "id": new_id("job"),
        "kind": spec.kind,
        "task_id": task_id,
        "run_at": spec.run_at,
        "attempts": 0,
        "payload": dumps(spec.payload),
        "created_at": now,
    }


def logs_callback(logged: int, max_callbacks: int | None, *, moved: bool) -> bool:
    """Whether one more callback goes in a log that holds `logged` (the per-task cap). A callback
    past the cap is still decided and answered as the contract says; only its row is not kept —
    unless it `moved` the task to another state (a handful per task at most): the result is
    always in the log, however many callbacks came before it, and a repeat of it is a duplicate."""
    return max_callbacks is None or logged < max_callbacks or moved


def callback_row(callback: IncomingCallback, applied: Applied, report: Report) -> dict[str, Any]:
    """The callback log row, with the verdict the transaction reached."""
    return {
        "id": callback.id,
        "task_id": callback.task_id,
        "received_at": callback.received_at,
        "body": callback.body,
        "headers": dumps(dict(callback.headers)),
        "body_sha256": callback.body_sha256,
        "verdict": applied.verdict.value,
        "reason": applied.transition.reason,
        "dialect": report.dialect,
        "reported_state": None if report.unusable is not None else report.state.value,
        "provider_signature": callback.provider_signature,
    }


def lease_for(feed: ChangeFeed, now: float) -> Lease | None:
    """The lease new deliveries get at once, while a local dispatcher takes offers."""
    target = feed.offer_lease
    return Lease(target[0], now + target[1]) if target is not None else None


def wakes(applied: Applied) -> tuple[str, ...]:
    """The worker topics a committed transition must wake."""
    topics = []
    if applied.deliveries:
        topics.append(DELIVERIES)
    if applied.transition.jobs:
        topics.append(JOBS)
    return tuple(topics)


def announce(feed: ChangeFeed, applied: Applied) -> Applied:
    """After commit: publish the changed task, hand the local dispatcher what was leased to it,
    and wake the workers it gave work."""
    if applied.transition.changed:
        feed.publish(applied.task)
    if applied.offered:
        feed.offer(applied.offered)
    for topic in wakes(applied):
        feed.wake(topic)
    return applied
