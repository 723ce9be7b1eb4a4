from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from receiver.config import DEFAULT_RETRY_SCHEDULE
from receiver.delivery.schedule import MAX_RETRY_AFTER, RetrySchedule, parse_retry_after


def test_the_default_schedule_gives_eight_attempts_with_jitter() -> None:
    schedule = RetrySchedule(DEFAULT_RETRY_SCHEDULE, rng=random.Random(7))
    assert schedule.attempts == 8
    for attempts, nominal in enumerate(DEFAULT_RETRY_SCHEDULE[1:], start=1):
        delays = [schedule.delay_after(attempts) for _ in range(200)]
        assert all(d is not None and 0.8 * nominal <= d <= 1.2 * nominal for d in delays)
        assert len(set(delays)) > 1  # jittered, not in lockstep
    assert schedule.delay_after(8) is None  # exhausted


def test_jitter_comes_from_the_injected_random() -> None:
    first = [RetrySchedule((0, 10, 20), rng=random.Random(1)).delay_after(1) for _ in range(2)]
    assert first[0] == first[1]


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [
        pytest.param(None, 5.0, id="none"),
        pytest.param(60.0, 60.0, id="longer-wins"),
        pytest.param(1.0, 5.0, id="shorter-keeps-schedule"),
        pytest.param(10 * 86400.0, MAX_RETRY_AFTER, id="bounded"),
    ],
)
def test_retry_after_is_honoured_within_bounds(retry_after, expected) -> None:
    class NoJitter(random.Random):
        def uniform(self, a, b):
            return 1.0

    assert RetrySchedule((0, 5, 300), rng=NoJitter()).delay_after(1, retry_after=retry_after) == expected


def test_parse_retry_after() -> None:
    now = 1_790_000_000.0
    date = format_datetime(datetime.fromtimestamp(now + 120, tz=UTC), usegmt=True)
    assert parse_retry_after("30", now=now) == 30.0
    assert parse_retry_after(date, now=now) == pytest.approx(120.0)
    past = format_datetime(datetime.fromtimestamp(now - 120, tz=UTC), usegmt=True)
    assert parse_retry_after(past, now=now) == 0.0
    # "²" and "٣" are str.isdigit(); a subscriber's header must never raise (it would end the attempt unrecorded)
    for junk in (None, "", "soon", "-5", "1.5e9", "Mon, 99 Foo 2026", "²", "1²", "٣"):
        assert parse_retry_after(junk, now=now) is None


def test_an_empty_schedule_is_refused() -> None:
    with pytest.raises(ValueError):
        RetrySchedule(())
