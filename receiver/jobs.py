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

Leases are short (RECEIVER_JOB_LEASE, default 30 s) and renewed every third of
that while the job runs, so a crashed instance's jobs are retaken soon, however
long a handler may legitimately take. Two live instances never run one job at
once: a runner that cannot renew (the database is away) cancels the job while a
third of its lease is left, before anyone else may claim it. A handler that
hands its lease back itself (a synchronous call marks its job `calling` and
moves it past the call's timeout) says so with `hand_back()`, and is then left
alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial

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

_hand_back: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("job_hand_back", default=None)


def hand_back() -> None:
    """Called by a running handler that released its job's lease itself: stop renewing it."""
    release = _hand_back.get()
    if release is not None:
        release()


#: How long after a handler crashed its job is tried again.
_AFTER_CRASH = 30.0


class JobRunner:
    def __init__(self, ctx: Context, handlers: Mapping[str, Handler], *, concurrency: int = 32) -> None:
        self.ctx = ctx
        self.handlers = dict(handlers)
        self.concurrency = concurrency
        # Renewed while the job runs: a job claimed by a runner that died is free again after one lease.
        self.lease_seconds = ctx.settings.job_lease
        self.owner = f"jobs-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._running: set[asyncio.Task[None]] = set()
        self._held: dict[str, tuple[float, asyncio.Task[None]]] = {}  # job id -> (lease until, its task)
        self._renewer: asyncio.Task[None] | None = None

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
                self._start(job, now + self.lease_seconds)
            due = await store.next_job_due(kinds)
        if due is None or due <= now:
            # Nothing, or only jobs already running here or leased elsewhere: a finishing job
            # wakes the "jobs" topic, and the idle period catches leases that ran out.
            return None
        return due - now

    def _start(self, job: Job, until: float) -> None:
        task = asyncio.create_task(self._run(job), name=f"receiver-job-{job.kind}")
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        self._held[job.id] = (until, task)
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew(), name="receiver-job-leases")

    async def _renew(self) -> None:
        """Extend the leases of the jobs running here every third of a lease, while there are any."""
        interval = self.lease_seconds / 3
        while self._held:
            await asyncio.sleep(interval)
            ids = list(self._held)
            until = self.ctx.clock() + self.lease_seconds
            try:
                # A renewal that does not answer within a third of a lease (a partition, an exhausted
                # pool) counts as failed: the jobs must stop before another instance may claim them.
                async with asyncio.timeout(interval):
                    renewed = await self.ctx.store.renew_jobs(ids, owner=self.owner, until=until)
                kept: set[str] | None = set(renewed)
            except Exception as exc:  # the database is away or too slow: the leases run down
                log.warning("jobs.lease_not_renewed", count=len(ids), error=repr(exc)[:300])
                kept = None
            now = self.ctx.clock()
            for job_id in ids:
                held = self._held.get(job_id)  # None: finished or handed back meanwhile
                if held is None:
                    continue
                if kept is not None and job_id in kept:
                    self._held[job_id] = (until, held[1])
                elif kept is not None or now >= held[0] - interval:
                    # Lost (another runner holds it), or about to be claimable by another: stop now.
                    log.warning("jobs.lease_lost", job_id=job_id)
                    del self._held[job_id]
                    held[1].cancel()

    def _release(self, job_id: str) -> None:
        self._held.pop(job_id, None)

    async def _run(self, job: Job) -> None:
        _hand_back.set(partial(self._release, job.id))
        try:
            try:
                outcome = await self.handlers[job.kind](self.ctx, job)
            finally:
                self._release(job.id)
        except asyncio.CancelledError:  # shutdown, or a lost lease: the job stays as stored
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
        for task in [*self._running, *([self._renewer] if self._renewer else [])]:
            task.cancel()
        await asyncio.gather(*self._running, *([self._renewer] if self._renewer else []), return_exceptions=True)
        self._held.clear()
        with contextlib.suppress(Exception):  # the store may already be failing; leases expire anyway
            await self.ctx.store.release_leases(self.owner)
