"""A subscriber down for a while (refusing connections, or answering 503), then back.

Every event of every task reaches it once it is back, in order per task (`sequence`), while
another, healthy subscriber gets each event promptly throughout the outage. The retry schedule
and the breaker are compressed (tests/delivery/helpers.FAST) so the outage lasts about a second.
(tests/delivery/test_dispatcher.py covers one event per task and a hanging endpoint.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from receiver.clock import parse_iso
from receiver.fakes.subscriber import FakeSubscriber, Received
from receiver.server import free_port, serve_in_background
from tests.conftest import Running, start_receiver
from tests.delivery.helpers import FAST, SECRET, deliveries, eventually, new_task, set_running, subscribe, succeed

pytestmark = pytest.mark.anyio

#: Long enough to outlast a ~1.5 s outage without running out of attempts, short enough to be quick.
SCHEDULE = (0.0, 0.1, 0.2, 0.3) + (0.4,) * 20
SETTINGS: dict[str, Any] = {**FAST, "retry_schedule": SCHEDULE, "breaker_failures": 3, "breaker_cooldown": 0.3}
TASKS = 4
OUTAGE = 1.5  # seconds the subscriber is down, at least
HEALTHY_BOUND = 0.75  # seconds within which the healthy subscriber hears each change (typically milliseconds)


class Flaky:
    """A subscriber on a fixed port that can be taken down (`refused`: nothing listens) and back."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.fake = FakeSubscriber(secrets=[SECRET])
        self._serving: Any = None

    async def up(self) -> None:
        self.fake.mode = "ok"
        if self._serving is None:
            self._serving = serve_in_background(self.fake.app, port=self.port)
            await self._serving.__aenter__()

    async def down(self) -> None:
        if self.how == "503":
            self.fake.mode, self.fake.fail_status = "fail", 503
            if self._serving is None:
                await self.up()
                self.fake.mode = "fail"
        elif self._serving is not None:
            await self._serving.__aexit__(None, None, None)
            self._serving = None

    async def close(self) -> None:
        if self._serving is not None:
            await self._serving.__aexit__(None, None, None)
        self.fake.release()


@asynccontextmanager
async def flaky(how: str) -> AsyncIterator[Flaky]:
    endpoint = Flaky(how)
    try:
        yield endpoint
    finally:
        await endpoint.close()


@asynccontextmanager
async def healthy_sink() -> AsyncIterator[tuple[FakeSubscriber, str]]:
    fake = FakeSubscriber(secrets=[SECRET])
    async with serve_in_background(fake.app) as url:
        yield fake, f"{url}/hook"


async def heard(sink: FakeSubscriber, task_id: str, sequence: int, since: float) -> float:
    """Seconds from `since` until `sink` has the task's event of `sequence` (verified, answered 2xx)."""
    await sink.wait_for(lambda _: any(r.task_id == task_id and r.sequence == sequence for r in sink.verified), 5)
    got = next(r for r in sink.verified if r.task_id == task_id and r.sequence == sequence)
    return got.at - since


def per_task(received: list[Received]) -> dict[str, list[int]]:
    order: dict[str, list[int]] = {}
    for r in received:
        if r.task_id is not None and r.sequence is not None:
            order.setdefault(r.task_id, []).append(r.sequence)
    return order


@pytest.mark.parametrize("database", ["sqlite", "postgres"], indirect=True)
@pytest.mark.parametrize("how", ["refused", "503"])
async def test_a_subscriber_down_for_a_while_gets_everything_in_order(
    tmp_path: Path, database_url: str, how: str
) -> None:
    async with (
        flaky(how) as down,
        healthy_sink() as (healthy, healthy_url),
        start_receiver(tmp_path, database_url=database_url, **SETTINGS) as running,
    ):
        await down.down()
        await subscribe(running, down.url)
        await subscribe(running, healthy_url)
        went_down = time.monotonic()
        latencies, expected = await _changes_during_outage(running, healthy)
        await asyncio.sleep(max(0.0, OUTAGE - (time.monotonic() - went_down)))
        # While it was down the healthy subscriber heard each change promptly.
        assert max(latencies) < HEALTHY_BOUND, latencies
        assert per_task(healthy.verified) == expected
        if how == "503":
            assert any(r.status == 503 for r in down.fake.received)  # it was tried, and failed
        assert not down.fake.verified
        pending = await deliveries(running, status="pending")
        assert len(pending) == TASKS * 3  # nothing given up on while it was down
        failures = [a["error"] for d in pending for a in d["attempts"]]
        assert failures and all(failures), failures  # it was tried, and each try failed

        await down.up()
        await down.fake.wait_for(lambda _: len(down.fake.verified) == TASKS * 3, timeout=15)
        # Every event once it was back, in order per task, each exactly once.
        assert per_task(down.fake.verified) == expected
        ids = [r.webhook_id for r in down.fake.verified]
        assert len(set(ids)) == len(ids)
        done = await eventually(lambda: _all_succeeded(running))
        assert len(done) == TASKS * 3 * 2


async def _changes_during_outage(running: Running, healthy: FakeSubscriber) -> tuple[list[float], dict[str, list[int]]]:
    """TASKS tasks through submitted → running → succeeded; how soon the healthy subscriber heard each."""
    latencies: list[float] = []
    expected: dict[str, list[int]] = {}
    for n in range(TASKS):
        since = time.time()
        task, callback_url = await new_task(running)
        latencies.append(await heard(healthy, task["id"], task["sequence"], since))
        since = time.time()
        await set_running(running, task["id"])
        latencies.append(await heard(healthy, task["id"], task["sequence"] + 1, since))
        since = time.time()
        await succeed(running, callback_url, upstream=f"up-{n}")
        latencies.append(await heard(healthy, task["id"], task["sequence"] + 2, since))
        expected[task["id"]] = [task["sequence"], task["sequence"] + 1, task["sequence"] + 2]
        await asyncio.sleep(0.05)
    # The events' own timestamps agree: each went out as soon as it was written.
    stamps = [r.at - parse_iso(r.event["timestamp"]) for r in healthy.verified]
    assert max(stamps) < HEALTHY_BOUND + 1.0, stamps  # timestamps are whole seconds
    return latencies, expected


async def _all_succeeded(running: Running) -> list[Any] | None:
    found = await deliveries(running)
    return found if found and all(d["status"] == "succeeded" for d in found) else None
