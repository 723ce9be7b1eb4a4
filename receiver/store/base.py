"""The Store protocol: everything the receiver keeps, behind one interface.

Every state change goes through `transition` or `record_callback`, which run
a pure decision (receiver.tasks) inside one transaction that also writes the
callback log and the outbox (events and deliveries), so an acknowledged
change can never lose or invent a notification. Backends: `sqlite.py`
(embedded default) and `postgres.py`.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from receiver.broadcast import ChangeFeed
from receiver.clock import isoformat
from receiver.tasks import JobSpec, Report, Task, Transition
from receiver.types import JSON, DeliveryStatus, EventType, TaskState, Value, Verdict, fields_of

Decide = Callable[[Task], Transition]

#: A callback's log entry never keeps a header whose name has one of these in it, as it may carry a
#: credential (`authorization`, `cookie`, `x-api-key`, `x-gitlab-token`, `x-webhook-secret`,
#: `x-signing-key`; `idempotency-key` goes too). Signatures stay: they prove, they do not open.
CREDENTIAL_WORDS = ("token", "secret", "password", "passwd", "key", "auth", "credential", "session", "cookie")


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    key: str
    fingerprint: str


@dataclass(frozen=True, slots=True)
class CreatedTask:
    """`create_task`'s answer: the new task, or the one an idempotency key already names."""

    task: Task
    created: bool
    same_request: bool = True


@dataclass(frozen=True, slots=True)
class IncomingCallback(Value):
    """A callback as received, before any decision."""

    id: str
    task_id: str
    received_at: float
    body: bytes
    headers: Mapping[str, str]
    body_sha256: str
    provider_signature: str | None = None  # "verified", "unchecked" (no secret configured), None: unsigned


@dataclass(frozen=True, slots=True)
class StoredCallback:
    id: str
    task_id: str
    received_at: float
    body: bytes
    headers: Mapping[str, str]
    verdict: Verdict
    reason: str | None
    dialect: str | None
    reported_state: str | None
    provider_signature: str | None = None

    def to_api(self) -> JSON:
        """`body` parsed for reading; `raw_body` byte for byte as received (UTF-8 text, or base64
        when the bytes are not UTF-8: `raw_body_encoding`), e.g. to check a provider's signature
        again or to see what parsing a body normalises (number precision, escapes, spacing)."""
        try:
            body: Any = orjson.loads(self.body)
        except orjson.JSONDecodeError:
            body = self.body.decode("utf-8", "replace")
        try:
            raw, encoding = self.body.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            raw, encoding = base64.b64encode(self.body).decode("ascii"), "base64"
        return {
            "id": self.id,
            "task_id": self.task_id,
            "received_at": isoformat(self.received_at),
            "verdict": self.verdict.value,
            "duplicate": self.verdict is Verdict.DUPLICATE,
            "ignored": self.verdict is Verdict.IGNORED,
            "reason": self.reason,
            "dialect": self.dialect,
            "reported_state": self.reported_state,
            "provider_signature": self.provider_signature,
            "headers": dict(self.headers),
            "body": body,
            "raw_body": raw,
            "raw_body_encoding": encoding,
        }


@dataclass(frozen=True, slots=True)
class Applied(Value):
    """What a committed transition did."""

    task: Task  # the task after the change (or as it is, if unchanged)
    transition: Transition
    deliveries: int = 0  # outbox rows written
    offered: tuple[DeliveryJob, ...] = ()  # of those, the ones leased at once to the local dispatcher
    logged: bool = True  # a callback went into its task's log (False: the log was full)

    @property
    def verdict(self) -> Verdict:
        return self.transition.verdict

    def __reduce__(self) -> tuple[Any, ...]:
        # The SQLite writer answers every write with one of these, so it pickles flat: the task as
        # its fields, the transition's task (this task, or none) not a second time, and enums as
        # their values rather than one reduce call each: a third less time, there and back, than
        # pickling the tree of values (bench/README.md).
        transition = self.transition
        if transition.task is self.task:
            link = _SAME_TASK
        elif transition.task is None:
            link = _NO_TASK
        else:
            return (Applied, fields_of(self))  # not written by the stores: pickled the plain way
        task = list(fields_of(self.task))
        task[_STATE] = task[_STATE].value
        _, events, verdict, reason, jobs = fields_of(transition)
        decided = (tuple(event.value for event in events), verdict.value, reason, jobs)
        return (_rebuild_applied, (tuple(task), link, decided, self.deliveries, self.offered, self.logged))


_SAME_TASK, _NO_TASK = 0, 1
_STATE = tuple(Task.__dataclass_fields__).index("state")
_STATES = {state.value: state for state in TaskState}
_EVENTS = {event.value: event for event in EventType}
_VERDICTS = {verdict.value: verdict for verdict in Verdict}


def _rebuild_applied(
    task_fields: tuple[Any, ...],
    link: int,
    decided: tuple[tuple[str, ...], str, str | None, tuple[JobSpec, ...]],
    deliveries: int,
    offered: tuple[DeliveryJob, ...],
    logged: bool,
) -> Applied:
    """`Applied.__reduce__`'s other half."""
    fields = list(task_fields)
    fields[_STATE] = _STATES[fields[_STATE]]
    task = Task(*fields)
    events, verdict, reason, jobs = decided
    transition = Transition(
        task if link == _SAME_TASK else None,
        tuple(_EVENTS[event] for event in events),
        _VERDICTS[verdict],
        reason,
        jobs,
    )
    return Applied(task, transition, deliveries, offered, logged)


@dataclass(frozen=True, slots=True)
class TaskQuery:
    upstream_task_id: str | None = None
    state: TaskState | None = None
    provider: str | None = None
    before_id: str | None = None  # the cursor: ids sort by creation time
    limit: int = 20


@dataclass(frozen=True, slots=True)
class Subscription:
    id: str
    url: str
    events: tuple[str, ...]
    secret: str
    created_at: float
    updated_at: float
    description: str | None = None
    enabled: bool = True
    task_id: str | None = None  # set: a task's notify_url, for that task alone
    previous_secret: str | None = None
    previous_secret_expires_at: float | None = None
    disabled_reason: str | None = None
    failing_since: float | None = None
    uses_notify_secret: bool = False  # signed with RECEIVER_NOTIFY_SECRET instead of `secret`

    def replace(self, **changes: Any) -> Subscription:
        return dataclasses.replace(self, **changes)

    def signing_secrets(self, now: float) -> tuple[str, ...]:
        """The current secret, plus the previous one during a rotation's overlap."""
        if (
            self.previous_secret
            and self.previous_secret_expires_at is not None
            and now < self.previous_secret_expires_at
        ):
            return (self.secret, self.previous_secret)
        return (self.secret,)

    def to_api(self, *, reveal_secret: bool = False) -> JSON:
        return {
            "id": self.id,
            "url": self.url,
            "events": list(self.events),
            "description": self.description,
            "enabled": self.enabled,
            "task_id": self.task_id,
            "disabled_reason": self.disabled_reason,
            "failing_since": isoformat(self.failing_since),
            "secret": self.secret if reveal_secret else _mask(self.secret),
            "previous_secret_expires_at": isoformat(self.previous_secret_expires_at),
            "created_at": isoformat(self.created_at),
            "updated_at": isoformat(self.updated_at),
        }


def _mask(secret: str) -> str:
    return secret[:10] + "…" if secret else ""


@dataclass(frozen=True, slots=True)
class Attempt:
    at: float
    status_code: int | None
    latency_ms: float
    error: str | None = None
    response_body: str | None = None

    def to_api(self) -> JSON:
        return {
            "at": isoformat(self.at),
            "status_code": self.status_code,
            "latency_ms": round(self.latency_ms, 2),
            "error": self.error,
            "response_body": self.response_body,
        }


@dataclass(frozen=True, slots=True)
class Delivery:
    id: str
    event_id: str
    subscription_id: str
    task_id: str | None
    event_type: str
    sequence: int
    status: DeliveryStatus
    attempt_count: int
    next_attempt_at: float | None
    created_at: float
    updated_at: float
    attempts: tuple[Attempt, ...] = ()

    def to_api(self) -> JSON:
        return {
            "id": self.id,
            "subscription_id": self.subscription_id,
            "task_id": self.task_id,
            "event_id": self.event_id,
            "event_type": self.event_type,
            "sequence": self.sequence,
            "status": self.status.value,
            "attempt_count": self.attempt_count,
            "next_attempt_at": isoformat(self.next_attempt_at),
            "created_at": isoformat(self.created_at),
            "updated_at": isoformat(self.updated_at),
            "attempts": [a.to_api() for a in self.attempts],
        }


@dataclass(frozen=True, slots=True)
class DeliveryJob:
    """A claimed delivery: everything the dispatcher needs to send one attempt."""

    delivery: Delivery
    subscription: Subscription
    body: bytes


@dataclass(frozen=True, slots=True)
class Lease(Value):
    """A lease taken at creation: a transaction that writes deliveries leases those that are
    first in line for their endpoint to `owner` (the local dispatcher) until `until`, and they
    are handed to it after commit (`Applied.offered`), without a claim round trip."""

    owner: str
    until: float


@dataclass(frozen=True, slots=True)
class DeliveryQuery:
    subscription_id: str | None = None
    task_id: str | None = None
    status: DeliveryStatus | None = None
    before_id: str | None = None
    limit: int = 50


@dataclass(frozen=True, slots=True)
class AttemptOutcome:
    """How one attempt ended and what happens next.

    `next_attempt_at` None with status PENDING is impossible; SUCCEEDED and
    FAILED are final. `disable` names why the subscription must stop.
    """

    attempt: Attempt
    status: DeliveryStatus
    next_attempt_at: float | None = None
    disable: str | None = None


@dataclass(frozen=True, slots=True)
class Job:
    """Background work tied to a task (polling, a synchronous provider call, mirroring)."""

    id: str
    kind: str
    task_id: str
    run_at: float
    attempts: int = 0
    payload: JSON = field(default_factory=dict)


class Store(Protocol):
    """Persistence for tasks, callbacks, idempotency keys, subscriptions, the outbox and jobs."""

    feed: ChangeFeed

    async def open(self) -> None:
        """Connect and apply pending migrations."""

    async def close(self) -> None: ...

    async def migrate(self) -> list[str]:
        """Apply pending migrations; return the versions applied."""

    async def check_ready(self) -> str | None:
        """None when the database answers and migrations are current, else why not."""

    # Tasks -------------------------------------------------------------------
    async def create_task(
        self,
        task: Task,
        *,
        idempotency: IdempotencyKey | None = None,
        notify_subscription: Subscription | None = None,
        jobs: Sequence[JobSpec] = (),
        events: Sequence[EventType] = (),
    ) -> CreatedTask:
        """Insert a task with its idempotency key, notify_url subscription, first jobs and
        events (of the task as inserted), atomically.

        If the idempotency key is already taken, nothing is written and the task it names is returned
        (`created=False`, `same_request` telling whether the fingerprints match).
        """

    async def get_task(self, task_id: str) -> Task | None: ...

    async def list_tasks(self, query: TaskQuery) -> list[Task]: ...

    async def transition(self, task_id: str, decide: Decide) -> Applied:
        """Run `decide` on the current task inside a transaction and write what it returns."""

    async def record_callback(
        self, callback: IncomingCallback, report: Report, *, max_callbacks: int | None = None
    ) -> Applied:
        """Log `callback` and apply `report` to its task in one transaction.

        Duplicates (same body already stored for the task) are logged and change nothing.
        Raises TaskMismatch (nothing written) when the report names another upstream task. Once the
        task has `max_callbacks` callbacks logged (counted in the same query as the duplicate check)
        a callback is still applied, but not logged: `Applied.logged` is False.
        """

    async def list_callbacks(self, task_id: str) -> list[StoredCallback]: ...

    async def tasks_due_for_expiry(self, now: float, limit: int) -> list[str]: ...

    async def expire_tasks(self, now: float, limit: int) -> list[Applied]:
        """Expire (`tasks.expire`) up to `limit` open tasks past their deadline, oldest deadline
        first, in one transaction; returns what changed.

        Tasks another instance is expiring at that moment are skipped, so sweeps running
        on several instances share the work instead of repeating it.
        """

    # Subscriptions -----------------------------------------------------------
    async def create_subscription(self, subscription: Subscription) -> Subscription: ...

    async def get_subscription(self, subscription_id: str) -> Subscription | None: ...

    async def list_subscriptions(self, *, include_task_scoped: bool = False) -> list[Subscription]: ...

    async def update_subscription(self, subscription_id: str, **changes: Any) -> Subscription | None: ...

    async def delete_subscription(self, subscription_id: str) -> bool: ...

    async def emit_event(self, event_type: EventType, data: JSON, *, subscription_id: str | None = None) -> int:
        """Write an event not tied to a task change (e.g. `ping`) to the outbox; returns deliveries."""

    # Deliveries --------------------------------------------------------------
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
        """Lease due deliveries, oldest first, never one whose earlier event (same
        subscription and task) is still pending, nor one of `exclude_subscriptions`
        (endpoints the dispatcher is not sending to right now: busy or paused), and at most
        `per_subscription` for one subscription (what one endpoint may take at once)."""

    async def finish_attempt(self, delivery_id: str, owner: str, outcome: AttemptOutcome) -> None:
        """Record an attempt and release the lease (a no-op if the lease was lost)."""

    async def release_leases(self, owner: str) -> int:
        """Hand back every delivery and job `owner` holds (graceful shutdown)."""

    async def release_deliveries(self, delivery_ids: Sequence[str], owner: str) -> int:
        """Hand back claimed deliveries unsent: the lease is dropped, no attempt is
        recorded and nothing else changes, so they are claimable again at once.

            await store.release_deliveries(["dlv_…"], owner)   # e.g. more than an endpoint may take now
        """

    async def get_delivery(self, delivery_id: str) -> Delivery | None: ...

    async def list_deliveries(self, query: DeliveryQuery) -> list[Delivery]: ...

    async def retry_delivery(self, delivery_id: str, *, now: float) -> Delivery | None:
        """Make a delivery that ended pending again, due now (None: no such delivery, its
        subscription was deleted — it could never go out —, or it is pending already: a retry
        racing another changes nothing, so an attempt is never sent twice at once). While a local
        dispatcher takes offers and the delivery is first in line, it is leased to it at once and
        handed over to be sent now (`ChangeFeed.resend`), even to a paused endpoint."""

    async def recover_deliveries(self, subscription_id: str, *, since: float, now: float) -> int:
        """Make every failed delivery of a subscription since `since` pending again."""

    async def next_delivery_due(self, *, exclude_subscriptions: Collection[str] = ()) -> float | None:
        """When the earliest delivery that `claim_deliveries` could hand out is due
        (None: nothing pending). Only the first pending event of each subscription and
        task counts (later ones wait for it), and a leased one counts from its lease's end."""

    # Jobs --------------------------------------------------------------------
    async def schedule_job(self, task_id: str, kind: str, *, run_at: float, payload: JSON) -> Job: ...

    async def claim_jobs(
        self, kinds: Sequence[str], *, now: float, limit: int, owner: str, lease_seconds: float
    ) -> list[Job]: ...

    async def finish_job(self, job_id: str, *, reschedule_at: float | None = None, payload: JSON | None = None) -> None:
        """Delete a finished job, or put it back for `reschedule_at` (attempts + 1)."""

    async def renew_jobs(self, job_ids: Sequence[str], *, owner: str, until: float) -> list[str]:
        """Extend `owner`'s leases on these jobs to `until`; returns the ids it still held."""

    async def next_job_due(self, kinds: Sequence[str]) -> float | None: ...

    # Counts (metrics, readiness) ---------------------------------------------
    async def counts(self) -> dict[str, Any]:
        """Tasks by state, pending deliveries, pending jobs by kind."""
