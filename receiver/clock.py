"""Time: the system clock, a controllable one for tests, and ISO-8601 formatting."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from receiver.types import Clock

system_clock: Clock = time.time


class FakeClock:
    """A clock that only moves when told to.

    >>> clock = FakeClock(1_700_000_000.0); clock.advance(60); clock()
    1700000060.0
    """

    def __init__(self, now: float = 1_790_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def isoformat(timestamp: float | None) -> str | None:
    """Unix seconds as `2026-11-21T08:00:00.123Z` (None stays None)."""
    if timestamp is None:
        return None
    moment = datetime.fromtimestamp(timestamp, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(value: str) -> float:
    """The inverse of `isoformat`; raises ValueError for anything else."""
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
