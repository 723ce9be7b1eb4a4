"""A circuit breaker for one subscriber endpoint.

    breaker = Breaker(threshold=5, cooldown=30.0)
    breaker.capacity(now, limit=10)     # requests that may be in flight now: 10, 1 (a probe) or 0
    breaker.record(ok=False, now=now)   # after each attempt

After `threshold` consecutive failed attempts the endpoint is paused for
`cooldown` seconds; then one request probes it. A probe that succeeds closes
the breaker, one that fails pauses the endpoint again. The dispatcher sends
nothing to a paused endpoint, so a dead subscriber costs the others nothing
and its deliveries keep their retry budget for when it is back.
"""

from __future__ import annotations

import enum


class State(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Breaker:
    def __init__(self, *, threshold: int, cooldown: float) -> None:
        if threshold < 1 or cooldown < 0:
            raise ValueError("threshold must be >= 1 and cooldown >= 0")
        self.threshold = threshold
        self.cooldown = cooldown
        self.failures = 0  # consecutive
        self.open_until: float | None = None

    def __repr__(self) -> str:
        return f"Breaker(failures={self.failures}, open_until={self.open_until})"

    def state(self, now: float) -> State:
        if self.open_until is None:
            return State.CLOSED
        return State.OPEN if now < self.open_until else State.HALF_OPEN

    def capacity(self, now: float, *, limit: int) -> int:
        """How many requests may be in flight to the endpoint now."""
        state = self.state(now)
        if state is State.CLOSED:
            return limit
        return 1 if state is State.HALF_OPEN else 0

    def record(self, *, ok: bool, now: float) -> State:
        """Count one finished attempt; returns the state it leaves the breaker in."""
        if ok:
            self.failures = 0
            self.open_until = None
            return State.CLOSED
        self.failures += 1
        probe_failed = self.state(now) is State.HALF_OPEN
        if probe_failed or self.failures >= self.threshold:
            self.open_until = max(self.open_until or 0.0, now + self.cooldown)
        return self.state(now)

    @property
    def idle(self) -> bool:
        """Nothing to remember: closed with no failure counted."""
        return self.failures == 0 and self.open_until is None
