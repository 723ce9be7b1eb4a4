"""The events sent to subscribers (DESIGN.md §3 "Events sent to subscribers").

The body of an event is built once, when the state change commits, and sent
byte for byte on every attempt, so a retry is the same message.
"""

from __future__ import annotations

from typing import Any

import orjson

from receiver.clock import isoformat
from receiver.tasks import Task
from receiver.types import EventType


def event_body(event_type: EventType, data: dict[str, Any], *, now: float) -> bytes:
    """`{"type", "timestamp", "data"}` as compact JSON bytes."""
    return orjson.dumps({"type": event_type.value, "timestamp": isoformat(now), "data": data})


def task_event_body(event_type: EventType, task: Task, *, now: float) -> bytes:
    return event_body(event_type, task.to_api(), now=now)


def matches(filters: list[str] | tuple[str, ...], event_type: str) -> bool:
    """Does a subscription's event filter take this event? `*` takes every task event; ping always."""
    if event_type == EventType.PING:
        return True
    return "*" in filters or event_type in filters
