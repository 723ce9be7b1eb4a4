"""Server-Sent Events over a real socket: the task now, each change, heartbeats, the end."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from receiver.routes import streams
from tests.conftest import API_KEY, Running, postgres_database, start_receiver
from tests.delivery.helpers import deliveries, eventually, new_task, set_running, sink, subscribe, succeed
from tests.test_e2e import assert_error

pytestmark = pytest.mark.anyio


async def frames(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """Each SSE block as a dict; comments under "comment"."""
    block: dict[str, Any] = {}
    async for line in response.aiter_lines():
        if line == "":
            if block:
                yield block
            block = {}
        elif line.startswith(":"):
            block.setdefault("comment", []).append(line[1:].strip())
        else:
            name, _, value = line.partition(": ")
            block[name] = value
    if block:
        yield block


async def test_a_task_as_it_changes_until_it_ends(running: Running) -> None:
    task, callback_url = await new_task(running)
    async with running.api.stream("GET", f"/v1/tasks/{task['id']}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        seen = []
        async for frame in frames(response):
            if "event" not in frame:
                continue
            seen.append(frame)
            if frame["event"] == "task.submitted":
                await set_running(running, task["id"])
            elif frame["event"] == "task.running":
                await succeed(running, callback_url)
    # The stream ended by itself after the terminal state.
    assert [(f["id"], f["event"]) for f in seen] == [("1", "task.submitted"), ("2", "task.running"),
                                                     ("3", "task.succeeded")]
    assert seen[0]["retry"] == "3000"
    last = orjson.loads(seen[-1]["data"])
    assert last["id"] == task["id"] and last["state"] == "succeeded" and last["sequence"] == 3
    assert running.ctx.store.feed.listener_count(task["id"]) == 0


async def test_a_finished_task_is_one_event(running: Running) -> None:
    task, callback_url = await new_task(running)
    await succeed(running, callback_url)
    async with running.api.stream("GET", f"/v1/tasks/{task['id']}/events") as response:
        events = [f async for f in frames(response)]
    assert [f["event"] for f in events] == ["task.succeeded"]


async def test_a_reconnecting_client_gets_only_what_is_newer(running: Running) -> None:
    """EventSource reconnects after every close, with the last id it saw (the task's sequence)."""
    task, callback_url = await new_task(running)
    path = f"/v1/tasks/{task['id']}/events"

    async def events(last: str | None) -> list[dict[str, Any]]:
        headers = {"last-event-id": last} if last is not None else {}
        async with running.api.stream("GET", path, headers=headers) as response:
            assert response.status_code == 200
            got = []
            async for frame in frames(response):
                if "event" in frame:
                    got.append(frame)
                    if frame["event"] == "task.running":
                        await succeed(running, callback_url)
                elif frame.get("retry") and not got:
                    await set_running(running, task["id"])  # a change after the client reconnected
            return got

    # It saw 1 (submitted): the stream skips it and sends what follows, to the end.
    assert [(f["id"], f["event"]) for f in await events("1")] == [("2", "task.running"), ("3", "task.succeeded")]
    # It has the last one: 204, which tells an EventSource to stop, and no stream slot is taken.
    for last in ("3", "99999999999999999999999", "9" * 5000):  # any id past the last is past it
        async with running.api.stream("GET", path, headers={"last-event-id": last}) as response:
            assert response.status_code == 204
    # An id that is not ours is no resume point: the task as it is.
    assert [f["event"] for f in await events("garbage")] == ["task.succeeded"]


async def test_heartbeats_and_a_client_that_leaves(running: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streams, "HEARTBEAT", 0.05)
    task, _ = await new_task(running)
    feed = running.ctx.store.feed
    async with running.api.stream("GET", f"/v1/tasks/{task['id']}/events") as response:
        beats = 0
        async for frame in frames(response):
            beats += "heartbeat" in frame.get("comment", [])
            if beats == 2:
                break
        assert feed.listener_count(task["id"]) == 1
    # The client went away: the stream notices and lets go of its listener.
    await eventually(lambda: _no_listener(feed, task["id"]), timeout=5)


async def _no_listener(feed, task_id: str) -> bool:
    return feed.listener_count(task_id) == 0


async def test_streams_end_cleanly_when_the_receiver_stops(tmp_path: Path) -> None:
    async with httpx.AsyncClient(timeout=10, headers={"authorization": f"Bearer {API_KEY}"}) as client:
        async with start_receiver(tmp_path) as running:
            task, _ = await new_task(running)

            async def read() -> list[dict[str, Any]]:
                async with client.stream("GET", f"{running.url}/v1/tasks/{task['id']}/events") as response:
                    return [f async for f in frames(response)]

            reader = asyncio.create_task(read())
            await eventually(lambda: _listening(running, task["id"]))
            stopping = time.monotonic()
        got = await asyncio.wait_for(reader, 5)
        assert time.monotonic() - stopping < 5  # not uvicorn's 10 s graceful timeout
    assert [f.get("event") for f in got if "event" in f] == ["task.submitted"]
    assert "the receiver is shutting down" in got[-1]["comment"]


async def _listening(running: Running, task_id: str) -> bool:
    return running.ctx.store.feed.listener_count(task_id) == 1


async def test_unknown_tasks_and_missing_keys(running: Running) -> None:
    assert_error(await running.api.get("/v1/tasks/tsk_nope/events"), 404, "task_not_found")
    async with httpx.AsyncClient(base_url=running.url) as anonymous:
        assert_error(await anonymous.get("/v1/tasks/tsk_nope/events"), 401, "unauthorized")


# --- GET /v1/stream: the dashboard's view of everything ---------------------------------------------


class Activity:
    """Reads a dashboard stream in the background: frames as (event, data)."""

    def __init__(self, client: httpx.AsyncClient, url: str = "/v1/stream") -> None:
        self.client, self.url = client, url
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self.ready = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Activity:
        self._reader = asyncio.create_task(self._read())
        await asyncio.wait_for(self.ready.wait(), 5)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._reader is not None
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader

    async def _read(self) -> None:
        async with self.client.stream("GET", self.url) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            async for frame in frames(response):
                if frame.get("event") == "ready":
                    assert frame["retry"] == "3000"
                    self.ready.set()
                elif "event" in frame:
                    self.seen.append((frame["event"], orjson.loads(frame["data"])))

    async def wait_for(self, event: str, **fields: Any) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            for name, data in self.seen:
                if name == event and all(data.get(k) == v for k, v in fields.items()):
                    return data
            return None

        async def check() -> dict[str, Any] | None:
            return found()

        return await eventually(check, timeout=10)


async def test_the_dashboard_stream_shows_tasks_callbacks_and_delivery_attempts(running: Running) -> None:
    async with sink() as (subscriber, hook), Activity(running.api) as activity:
        await subscribe(running, hook)
        task, callback_url = await new_task(running)
        await activity.wait_for("task", id=task["id"], state="submitted")
        await succeed(running, callback_url)
        await activity.wait_for("task", id=task["id"], state="succeeded")
        logged = (await running.api.get(f"/v1/tasks/{task['id']}/callbacks")).json()["data"]
        assert await activity.wait_for("callback", id=logged[0]["id"]) == {"task_id": task["id"], "id": logged[0]["id"]}
        await succeed(running, callback_url)  # a duplicate changes no task, and still shows
        logged = (await running.api.get(f"/v1/tasks/{task['id']}/callbacks")).json()["data"]
        await activity.wait_for("callback", id=logged[1]["id"])
        await subscriber.wait_for(lambda got: len(got) >= 2)
        delivered = await deliveries(running, task_id=task["id"])
        for delivery in delivered:
            await activity.wait_for("delivery", id=delivery["id"], task_id=task["id"])
        assert running.ctx.store.feed.watcher_count() == 1
    await eventually(lambda: _no_watcher(running))


async def _no_watcher(running: Running) -> bool:
    limits = running.app.state.quotas
    held = limits.dashboard_streams.held() + limits.streams.held()
    return running.ctx.store.feed.watcher_count() == 0 and held == 0


async def test_dashboard_streams_are_capped_per_key(running: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(running.app.state.quotas.dashboard_streams, "limit", 2)
    async with Activity(running.api), Activity(running.api):
        answer = await running.api.get("/v1/stream")
        assert_error(answer, 429, "too_many_streams")
        assert answer.headers["retry-after"] == "5"
    await eventually(lambda: _no_watcher(running))
    async with Activity(running.api):  # the slots were given back
        pass


async def test_the_dashboard_stream_hears_every_instance(tmp_path: Path, fake_provider) -> None:
    async with (
        postgres_database() as url,
        start_receiver(tmp_path / "a", provider_url=fake_provider[1], database_url=url) as a,
        start_receiver(tmp_path / "b", provider_url=fake_provider[1], database_url=url) as b,
        Activity(b.api) as on_b,
    ):
        task, callback_url = await new_task(a)
        await on_b.wait_for("task", id=task["id"], state="submitted")
        await succeed(a, callback_url)
        await on_b.wait_for("task", id=task["id"], state="succeeded")
        await succeed(a, callback_url)  # a duplicate: a notice only
        logged = (await a.api.get(f"/v1/tasks/{task['id']}/callbacks")).json()["data"]
        for callback in logged:
            await on_b.wait_for("callback", id=callback["id"], task_id=task["id"])
