"""Task expiry: a task with no result by its deadline becomes `expired`, an event like any other."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from receiver.clock import FakeClock, isoformat
from receiver.ids import new_id
from receiver.tasks import JobSpec, Task
from receiver.types import TaskState
from receiver.workers import expire_due_tasks
from tests.conftest import start_receiver

pytestmark = pytest.mark.anyio

BODY = {"provider": "xhuoapi", "model": "gpt-image-2", "prompt": "[silent] a pear",
        "notify_url": "http://127.0.0.1:9/hook"}


def outbox(db: Path, task_id: str) -> tuple[list[tuple[str, int]], list[str]]:
    with sqlite3.connect(db) as conn:
        events = conn.execute("SELECT type, sequence FROM events WHERE task_id = ? ORDER BY sequence",
                              (task_id,)).fetchall()
        deliveries = conn.execute("SELECT event_type FROM deliveries WHERE task_id = ? ORDER BY sequence",
                                  (task_id,)).fetchall()
    return [tuple(e) for e in events], [d[0] for d in deliveries]


async def test_a_silent_task_expires_by_the_injected_clock(tmp_path: Path, fake_provider) -> None:
    _, url = fake_provider
    clock = FakeClock(time.time())
    async with start_receiver(tmp_path, provider_url=url, clock=clock, task_timeout=3600) as running:
        answer = await running.api.post("/v1/tasks", json=BODY)
        task = answer.json()
        assert task["expires_at"] == isoformat(clock() + 3600)

        clock.advance(3599)  # not yet due
        assert await expire_due_tasks(running.ctx) is None
        assert (await running.api.get(f"/v1/tasks/{task['id']}")).json()["state"] == "submitted"

        clock.advance(1)  # due: the expiry worker moves it on when woken (or at its next sweep)
        running.ctx.store.feed.wake("expiry")
        done = (await running.api.get(f"/v1/tasks/{task['id']}", params={"wait": 10})).json()
        assert done["state"] == "expired" and done["sequence"] == task["sequence"] + 1
        assert done["error"] == {"code": "task_timeout", "message": "No result arrived before the task's deadline."}
        assert done["completed_at"] == isoformat(clock())

        events, deliveries = await asyncio.to_thread(outbox, tmp_path / "receiver.db", task["id"])
        assert events == [("task.submitted", 2), ("task.expired", 3)]
        assert deliveries == ["task.submitted", "task.expired"]  # the notify_url subscription's outbox rows

        # A result that arrives after expiry is logged and ignored; the task stays expired.
        late = {"success": True, "task_id": task["upstream_task_id"], "data": {"data": [{"url": "https://a/b.png"}]}}
        callback_url = running.ctx.callback_url(task["id"], dialect="xhuoapi")
        ignored = await running.post_callback(callback_url, late)
        assert ignored.status_code == 200 and ignored.json()["ignored"] is True
        assert (await running.api.get(f"/v1/tasks/{task['id']}")).json()["state"] == "expired"


async def test_expiry_drops_the_tasks_jobs(tmp_path: Path) -> None:
    clock = FakeClock(time.time())
    async with start_receiver(tmp_path, clock=clock) as running:
        store = running.ctx.store
        now = clock()
        task = Task(id=new_id("tsk", clock), provider="xenodia", model="gpt-image-2", state=TaskState.SUBMITTED,
                    request={"prompt": "p"}, created_at=now, updated_at=now, expires_at=now + 10,
                    upstream_task_id="task_9")
        await store.create_task(task, jobs=[JobSpec("poll", now + 1000, {"poll_url": "/v1/tasks/task_9"})])
        assert await store.next_job_due(["poll"]) == pytest.approx(now + 1000)
        clock.advance(10)
        assert await expire_due_tasks(running.ctx) is None
        assert (await store.get_task(task.id)).state is TaskState.EXPIRED  # type: ignore[union-attr]
        assert await store.next_job_due(["poll"]) is None


async def test_a_large_backlog_is_swept_without_waiting(tmp_path: Path) -> None:
    clock = FakeClock(time.time())
    async with start_receiver(tmp_path, clock=clock) as running:
        now = clock()
        ids = []
        for _ in range(3):
            task = Task(id=new_id("tsk", clock), provider="auto", model=None, state=TaskState.SUBMITTED,
                        request={}, created_at=now, updated_at=now, expires_at=now + 1, origin="external")
            await running.ctx.store.create_task(task)
            ids.append(task.id)
        clock.advance(2)
        assert await expire_due_tasks(running.ctx, limit=2) == 0.0  # more may be due: sweep again at once
        assert await expire_due_tasks(running.ctx, limit=2) is None
        states = {(await running.ctx.store.get_task(i)).state for i in ids}  # type: ignore[union-attr]
        assert states == {TaskState.EXPIRED}
