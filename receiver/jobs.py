"""Background jobs tied to tasks (polls, synchronous provider calls, mirroring), run from the jobs table.

    runner = JobRunner(ctx, {"poll": poll_once, "router": call_once})
    workers.add("jobs", runner.step, topic="jobs", idle=1.0)
    …
    await runner.stop()

A due row is claimed with a lease and run as its own asyncio task (a call may
take minutes and must not hold the others up); then it is deleted or put back
for later with a new payload, as its handler decides. The schedule lives in
the row, so a restarted receiver carries on where the last one stopped, and a
job whose runner died is claimed again once its lease runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from receiver.context import Context
from receiver.logs import get_logger
from receiver.store.base import Job
from receiver.types import JSON

log = get_logger("receiver.jobs")


@dataclass(frozen=True, slots=True)
class Outcome:
    """A handler's decision: done (`run_at` None: the row is deleted) or run again at `run_at`."""

    run_at: float | None = None
    payload: JSON | None = None


DONE = Outcome()


def again(run_at: float, payload: JSON) -> Outcome:
    """Run the job again at `run_at` with `payload` (its attempts count grows by one)."""
    return Outcome(run_at, payload)


Handler = Callable[[Context, Job], Awaitable[Outcome]]

#: How long after a handler crashed its job is tried again.
_AFTER_CRASH = 30.0


class JobRunner:
    def __init__(self, ctx: Context, handlers: Mapping[str, Handler], *, concurrency: int = 32) -> None:
        self.ctx = ctx
        self.handlers = dict(handlers)
        self.concurrency = concurrency
        # A lease outlives one upstream request: a job claimed by a runner that died is free again after it.
        self.lease_seconds = max(ctx.settings.provider_timeout, ctx.settings.mirror_timeout) + 30.0
        self.owner = f"jobs-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._running: set[asyncio.Task[None]] = set()

    async def step(self) -> float | None:
        """Claim and start what is due; returns the seconds until the next job is due (None: idle)."""
        store, now = self.ctx.store, self.ctx.clock()
        kinds = list(self.handlers)
        due = await store.next_job_due(kinds)  # a read: an idle receiver writes nothing
        free = self.concurrency - len(self._running)
        if due is not None and due <= now and free > 0:
            for job in await store.claim_jobs(
                kinds, now=now, limit=free, owner=self.owner, lease_seconds=self.lease_seconds
            ):
                self._start(job)
            due = await store.next_job_due(kinds)
        if due is None or due <= now:
            # Nothing, or only jobs already running here or leased elsewhere: a finishing job
            # wakes the "jobs" topic, and the idle period catches leases that ran out.
            return None
        return due - now

    def _start(self, job: Job) -> None:
        task = asyncio.create_task(self._run(job), name=f"receiver-job-{job.kind}")
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, job: Job) -> None:
        try:
            outcome = await self.handlers[job.kind](self.ctx, job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # keep the job: it is tried again later
            log.error(
                "worker.failed", worker=f"jobs:{job.kind}", task_id=job.task_id, error=repr(exc)[:500], exc_info=True
            )
            # The payload stays as stored: the handler may have updated it before failing (a
            # synchronous call marks itself `calling`), and that mark must not be undone.
            outcome = Outcome(self.ctx.clock() + _AFTER_CRASH)
        try:
            await self.ctx.store.finish_job(job.id, reschedule_at=outcome.run_at, payload=outcome.payload)
        finally:
            self.ctx.store.feed.wake("jobs")

    async def stop(self) -> None:
        """Cancel the running jobs and hand their leases back (graceful shutdown)."""
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
        with contextlib.suppress(Exception):  # the store may already be failing; leases expire anyway
            await self.ctx.store.release_leases(self.owner)
