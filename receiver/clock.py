"""Time: the system clock, a controllable one for tests, and ISO-8601 formatting."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from functools import lru_cache

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
    """Unix seconds as `2026-11-21T08:00:00.123Z` (None stays None).

    Same result as `datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")`, in a
    fraction of its time: every event body formats several of these.
    """
    if timestamp is None:
        return None
    fraction, whole = math.modf(timestamp)
    micros = round(fraction * 1e6)  # rounded to microseconds first, as datetime does
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    elif micros < 0:
        whole, micros = whole - 1, micros + 1_000_000
    return f"{_seconds(int(whole))}.{micros // 1000:03d}Z"


@lru_cache(maxsize=4096)
def _seconds(whole: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))


def parse_iso(value: str) -> float:
    """The inverse of `isoformat`; raises ValueError for anything else."""
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
