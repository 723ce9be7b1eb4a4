from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from receiver.clock import FakeClock, isoformat, parse_iso


def reference(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_isoformat_matches_datetime() -> None:
    rng = random.Random(3)
    values = [rng.uniform(0, 4e9) for _ in range(20_000)]
    values += [1.7e9 + k / 1000 for k in range(2000)]
    values += [0.0, 1.5, 1e9 + 0.9995, 1e9 + 0.9999996, 1.9999995e9]
    for value in values:
        assert isoformat(value) == reference(value), value


def test_isoformat_round_trips_and_keeps_none() -> None:
    assert isoformat(None) is None
    assert isoformat(1_790_000_000.123) == "2026-09-21T14:13:20.123Z"
    assert parse_iso("2026-09-21T14:13:20.123Z") == pytest.approx(1_790_000_000.123)


def test_fake_clock_moves_when_told() -> None:
    clock = FakeClock(100.0)
    clock.advance(5)
    assert clock() == 105.0
