from __future__ import annotations

import pytest

from receiver.delivery.breaker import Breaker, State


def test_consecutive_failures_pause_then_one_probe() -> None:
    breaker = Breaker(threshold=3, cooldown=30)
    now = 1000.0
    for _ in range(2):
        assert breaker.record(ok=False, now=now) is State.CLOSED
    assert breaker.capacity(now, limit=10) == 10
    assert breaker.record(ok=False, now=now) is State.OPEN
    assert breaker.capacity(now + 29.9, limit=10) == 0
    assert breaker.state(now + 30) is State.HALF_OPEN and breaker.capacity(now + 30, limit=10) == 1
    # The probe fails: paused again, for a whole cooldown from then.
    assert breaker.record(ok=False, now=now + 31) is State.OPEN
    assert breaker.capacity(now + 60, limit=10) == 0 and breaker.capacity(now + 61, limit=10) == 1
    # The next probe succeeds: fully open for business.
    assert breaker.record(ok=True, now=now + 62) is State.CLOSED
    assert breaker.capacity(now + 62, limit=10) == 10 and breaker.idle


def test_a_success_resets_the_count() -> None:
    breaker = Breaker(threshold=2, cooldown=5)
    breaker.record(ok=False, now=0)
    breaker.record(ok=True, now=1)
    assert breaker.record(ok=False, now=2) is State.CLOSED
    assert not breaker.idle


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        Breaker(threshold=0, cooldown=1)
