"""Shared aliases and enums: task states, event types, delivery statuses."""

from __future__ import annotations

import enum
from typing import Any, ClassVar, Protocol, Self

JSON = dict[str, Any]


class TaskState(enum.StrEnum):
    QUEUED = "queued"
    SUBMITTED = "submitted"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.EXPIRED, TaskState.CANCELLED})


class EventType(enum.StrEnum):
    SUBMITTED = "task.submitted"
    RUNNING = "task.running"
    SUCCEEDED = "task.succeeded"
    FAILED = "task.failed"
    EXPIRED = "task.expired"
    CANCELLED = "task.cancelled"
    PING = "ping"

    @classmethod
    def for_state(cls, state: TaskState) -> EventType | None:
        """The event announcing that a task entered `state` (None for `queued`)."""
        return _STATE_EVENTS.get(state)


_STATE_EVENTS = {
    TaskState.SUBMITTED: EventType.SUBMITTED,
    TaskState.RUNNING: EventType.RUNNING,
    TaskState.SUCCEEDED: EventType.SUCCEEDED,
    TaskState.FAILED: EventType.FAILED,
    TaskState.EXPIRED: EventType.EXPIRED,
    TaskState.CANCELLED: EventType.CANCELLED,
}


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class Verdict(enum.StrEnum):
    """What the receiver made of one callback."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    IGNORED = "ignored"


class Value:
    """Base of the frozen, slotted dataclasses on hot paths: a `replace` and a pickling that skip
    `dataclasses`' per-call field introspection (values cross into the SQLite writer process and
    are rebuilt at every state change)."""

    __slots__ = ()
    __dataclass_fields__: ClassVar[dict[str, Any]]

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), tuple(getattr(self, name) for name in self.__dataclass_fields__))

    def replace(self, **changes: Any) -> Self:
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        values.update(changes)
        return type(self)(**values)


class Clock(Protocol):
    """Wall-clock time in unix seconds; tests pass a fake one."""

    def __call__(self) -> float: ...
