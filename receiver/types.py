"""Shared aliases and enums: task states, event types, delivery statuses."""

from __future__ import annotations

import enum
from collections.abc import Callable
from operator import attrgetter
from typing import Any, ClassVar, Protocol, Self

JSON = dict[str, Any]


class _Enum(enum.StrEnum):
    """Pickled by name (`TaskState.SUCCEEDED`): rebuilding one in the other process is an attribute
    lookup, where Enum's own pickling runs `TaskState("succeeded")` through Python code."""

    def __reduce_ex__(self, protocol: Any) -> str:  # type: ignore[override]
        return f"{type(self).__qualname__}.{self._name_}"


class TaskState(_Enum):
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


class EventType(_Enum):
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


class DeliveryStatus(_Enum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class Verdict(_Enum):
    """What the receiver made of one callback."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    IGNORED = "ignored"


#: Per Value class, one getter of all its fields as a tuple.
_FIELDS: dict[type, Callable[[Any], tuple[Any, ...]]] = {}


def _fields_getter(names: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    """A C-level attrgetter when it gives a tuple (two fields or more), else the same in Python."""
    if len(names) > 1:
        getter: Callable[[Any], tuple[Any, ...]] = attrgetter(*names)
        return getter
    return lambda value: tuple(getattr(value, name) for name in names)


def fields_of(value: Value) -> tuple[Any, ...]:
    """A value's fields in their order, in one C-level call: `type(value)(*fields_of(value))`
    rebuilds it."""
    cls = type(value)
    fields = _FIELDS.get(cls) or _FIELDS.setdefault(cls, _fields_getter(tuple(cls.__dataclass_fields__)))
    return fields(value)


class Value:
    """Base of the frozen, slotted dataclasses on hot paths: a `replace` and a pickling that skip
    `dataclasses`' per-call field introspection (values cross into the SQLite writer process and
    are rebuilt at every state change)."""

    __slots__ = ()
    __dataclass_fields__: ClassVar[dict[str, Any]]

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), fields_of(self))

    def replace(self, **changes: Any) -> Self:
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        values.update(changes)
        return type(self)(**values)


class Clock(Protocol):
    """Wall-clock time in unix seconds; tests pass a fake one."""

    def __call__(self) -> float: ...
