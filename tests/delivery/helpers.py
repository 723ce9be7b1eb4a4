"""Shared by the delivery tests: a subscriber sink on 127.0.0.1 and ways to make events happen."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar

from receiver.fakes.subscriber import FakeSubscriber
from receiver.server import serve_in_background
from receiver.tasks import Report, apply_report
from receiver.types import TaskState
from tests.conftest import Running

T = TypeVar("T")

SECRET = "whsec_c3Vic2NyaWJlci1zZWNyZXQtb2YtMzItYnl0ZXMh"  # 30 bytes
#: Retries and pauses compressed so a test takes well under a second of waiting.
FAST: dict[str, Any] = {
    "retry_schedule": (0.0, 0.05, 0.1),
    "delivery_timeout": 2.0,
    "breaker_failures": 100,
    "breaker_cooldown": 0.2,
}


@asynccontextmanager
async def sink(**options: Any) -> AsyncIterator[tuple[FakeSubscriber, str]]:
    """A FakeSubscriber verifying with SECRET, served on 127.0.0.1; yields it and its hook URL."""
    options.setdefault("secrets", [SECRET])
    fake = FakeSubscriber(**options)
    async with serve_in_background(fake.app) as url:
        try:
            yield fake, f"{url}/hook"
        finally:
            fake.release()


async def subscribe(running: Running, url: str, *, events: list[str] | None = None, secret: str = SECRET) -> Any:
    answer = await running.api.post("/v1/subscriptions", json={"url": url, "events": events or ["*"], "secret": secret})
    assert answer.status_code == 201, answer.text
    return answer.json()


async def new_task(running: Running, **metadata: Any) -> tuple[Any, str]:
    """A task in `submitted` (one task.submitted event) and its callback URL."""
    minted = await running.api.post("/v1/callback-urls", json={"provider": "xhuoapi", "metadata": metadata})
    assert minted.status_code == 201, minted.text
    return minted.json()["task"], minted.json()["callback_url"]


async def set_running(running: Running, task_id: str) -> None:
    await running.ctx.store.transition(
        task_id, partial(apply_report, report=Report(TaskState.RUNNING), now=running.ctx.clock())
    )


async def succeed(running: Running, callback_url: str, upstream: str = "up-1") -> None:
    body = {"success": True, "task_id": upstream, "data": {"data": [{"url": "https://cdn.example/a.png"}]}}
    answer = await running.post_callback(callback_url, body)
    assert answer.status_code == 200, answer.text


async def deliveries(running: Running, **params: Any) -> list[Any]:
    answer = await running.api.get("/v1/deliveries", params={"limit": 100, **params})
    assert answer.status_code == 200, answer.text
    data: list[Any] = answer.json()["data"]
    return data


async def eventually(
    check: Callable[[], Awaitable[T | None]], timeout: float = 10.0, what: str | None = None, every: float = 0.02
) -> T:
    """Poll `check` every `every` seconds until it returns something truthy (a deadline, never a long sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout:g}s: {what or check}")
        await asyncio.sleep(every)
