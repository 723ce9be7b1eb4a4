"""The job runner: leases, concurrency, rescheduling and crashes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from receiver.context import Context
from receiver.errors import StoreError
from receiver.ids import new_id
from receiver.jobs import DONE, JobRunner, Outcome, again
from receiver.store.base import Job
from receiver.tasks import JobSpec, Task
from receiver.types import TaskState
from tests.conftest import start_receiver

pytestmark = pytest.mark.anyio


async def new_task(ctx: Context, *jobs: JobSpec) -> Task:
    now = time.time()
    task = Task(id=new_id("tsk"), provider="xenodia", model="m", state=TaskState.SUBMITTED, request={"prompt": "p"},
                created_at=now, updated_at=now, expires_at=now + 3600)
    await ctx.store.create_task(task, jobs=jobs)
    return task


async def test_a_slow_job_does_not_hold_up_the_others(tmp_path: Path) -> None:
    async with start_receiver(tmp_path) as running:
        ctx = running.ctx
        release, quick_done = asyncio.Event(), asyncio.Event()

        async def slow(ctx: Context, job: Job) -> Outcome:
            await release.wait()
            return DONE

        async def quick(ctx: Context, job: Job) -> Outcome:
            quick_done.set()
            return DONE

        now = time.time()
        await new_task(ctx, JobSpec("t-slow", now - 1, {}))
        runner = JobRunner(ctx, {"t-slow": slow, "t-quick": quick})
        assert await runner.step() is None  # the slow one is running; nothing else is due
        await new_task(ctx, JobSpec("t-quick", now - 1, {}))
        await runner.step()
        await asyncio.wait_for(quick_done.wait(), 5)
        release.set()
        for _ in range(200):
            if await ctx.store.next_job_due(["t-slow", "t-quick"]) is None:
                break
            await asyncio.sleep(0.01)
        assert await ctx.store.next_job_due(["t-slow", "t-quick"]) is None
        await runner.stop()


async def test_a_job_is_rescheduled_with_its_new_payload(tmp_path: Path) -> None:
    async with start_receiver(tmp_path) as running:
        ctx = running.ctx
        seen: list[tuple[int, dict]] = []
        done = asyncio.Event()

        async def count(ctx: Context, job: Job) -> Outcome:
            seen.append((job.attempts, job.payload))
            if job.payload["n"] == 2:
                done.set()
                return DONE
            return again(ctx.clock(), {"n": job.payload["n"] + 1})

        await new_task(ctx, JobSpec("t-count", time.time() - 1, {"n": 0}))
        runner = JobRunner(ctx, {"t-count": count})
        for _ in range(100):
            await runner.step()
            if done.is_set():
                break
            await asyncio.sleep(0.01)
        assert seen == [(0, {"n": 0}), (1, {"n": 1}), (2, {"n": 2})]
        await runner.stop()


async def test_a_crashing_handler_keeps_its_job(tmp_path: Path, logs) -> None:
    async with start_receiver(tmp_path) as running:
        ctx = running.ctx
        crashed = asyncio.Event()

        async def boom(ctx: Context, job: Job) -> Outcome:
            crashed.set()
            raise RuntimeError("a bug")

        async def boom_after_marking(ctx: Context, job: Job) -> Outcome:
            await ctx.store.finish_job(job.id, reschedule_at=time.time() + 600, payload={"phase": "calling"})
            return await boom(ctx, job)

        task = await new_task(ctx, JobSpec("t-boom", time.time() - 1, {"phase": "pending"}))
        runner = JobRunner(ctx, {"t-boom": boom_after_marking})
        await runner.step()
        await asyncio.wait_for(crashed.wait(), 5)
        await runner.stop()
        due = await ctx.store.next_job_due(["t-boom"])
        assert due is not None and due > time.time() + 20  # tried again later, not lost
        [job] = await ctx.store.claim_jobs(["t-boom"], now=due, limit=1, owner="probe", lease_seconds=1)
        assert job.payload == {"phase": "calling"}  # what the handler stored survives its crash
        [failure] = logs.events("worker.failed")
        assert failure["worker"] == "jobs:t-boom" and failure["task_id"] == task.id
        logs.records.clear()  # the crash was the point of this test


async def test_stopping_cancels_running_jobs_and_frees_their_leases(tmp_path: Path) -> None:
    async with start_receiver(tmp_path) as running:
        ctx = running.ctx
        started = asyncio.Event()

        async def forever(ctx: Context, job: Job) -> Outcome:
            started.set()
            await asyncio.Event().wait()
            return DONE

        await new_task(ctx, JobSpec("t-forever", time.time() - 1, {}))
        runner = JobRunner(ctx, {"t-forever": forever})
        await runner.step()
        await asyncio.wait_for(started.wait(), 5)

        async def probe() -> int:
            claimed = await ctx.store.claim_jobs(["t-forever"], now=time.time(), limit=5, owner="probe",
                                                 lease_seconds=60)
            await ctx.store.release_leases("probe")
            return len(claimed)

        assert await probe() == 0  # leased by the runner
        await runner.stop()
        assert await probe() == 1  # handed back: claimable at once


@pytest.mark.parametrize("database_away", ["refuses", "hangs"])
async def test_a_running_job_keeps_its_lease_and_one_that_cannot_renew_stops_before_it_lapses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database_away: str
) -> None:
    async with start_receiver(tmp_path, job_lease=0.6) as running:
        ctx = running.ctx
        started, stopped = asyncio.Event(), asyncio.Event()

        async def long(ctx: Context, job: Job) -> Outcome:
            started.set()
            try:
                await asyncio.Event().wait()
            finally:
                stopped.set()
            return DONE

        await new_task(ctx, JobSpec("t-long", time.time() - 1, {}))
        runner = JobRunner(ctx, {"t-long": long})
        await runner.step()
        await asyncio.wait_for(started.wait(), 5)

        async def probe() -> int:
            claimed = await ctx.store.claim_jobs(["t-long"], now=time.time(), limit=5, owner="probe", lease_seconds=60)
            await ctx.store.release_leases("probe")
            return len(claimed)

        await asyncio.sleep(1.5)  # well past the first lease: renewed, so nobody else may take the job
        assert await probe() == 0 and not stopped.is_set()

        async def unreachable(*args: object, **kwargs: object) -> list[str]:
            if database_away == "hangs":  # a partition: the renewal never answers
                await asyncio.Event().wait()
            raise StoreError("the database is away")

        monkeypatch.setattr(ctx.store, "renew_jobs", unreachable)
        renewed_until = time.time() + 0.6  # at the latest
        await asyncio.wait_for(stopped.wait(), 2)
        assert time.time() < renewed_until  # stopped before the lease could lapse
        monkeypatch.undo()
        await asyncio.sleep(max(0.0, renewed_until - time.time()) + 0.1)
        assert await probe() == 1  # left as stored, for the next holder
        await runner.stop()
