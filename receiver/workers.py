"""Background work, started and stopped by the app's lifespan.

    workers = Workers(feed)
    workers.add("expiry", sweep_expired_once, topic="expiry", idle=5.0)
    await workers.start(); …; await workers.stop()

Each worker is a step function run in a loop: the step does what is due and
returns how long it may sleep; a `feed.wake(topic)` cuts the sleep short.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from receiver.broadcast import ChangeFeed
from receiver.context import Context
from receiver.errors import StoreError
from receiver.logs import get_logger

log = get_logger("receiver.workers")

Step = Callable[[], Awaitable[float | None]]


@dataclass
class _Worker:
    name: str
    step: Step
    topic: str
    idle: float
    task: asyncio.Task[None] | None = None


class Workers:
    def __init__(self, feed: ChangeFeed) -> None:
        self.feed = feed
        self._workers: list[_Worker] = []
        self._stopping = False

    def add(self, name: str, step: Step, *, topic: str, idle: float) -> None:
        """`step()` returns seconds until it has more to do (None: `idle`)."""
        self._workers.append(_Worker(name, step, topic, idle))

    async def start(self) -> None:
        for worker in self._workers:
            worker.task = asyncio.create_task(self._loop(worker), name=f"receiver-{worker.name}")

    async def stop(self) -> None:
        self._stopping = True
        for worker in self._workers:
            if worker.task is not None:
                worker.task.cancel()
        for worker in self._workers:
            if worker.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await worker.task

    async def _loop(self, worker: _Worker) -> None:
        while not self._stopping:
            try:
                pause = await worker.step()
            except asyncio.CancelledError:
                raise
            except StoreError as exc:  # the database is away for a moment: try again later
                log.warning("worker.store_unavailable", worker=worker.name, error=str(exc)[:300])
                pause = min(1.0, worker.idle)
            except Exception as exc:  # one bad step must not end the worker
                log.error("worker.failed", worker=worker.name, error=repr(exc)[:500], exc_info=True)
                pause = worker.idle
            delay = worker.idle if pause is None else max(0.0, min(pause, worker.idle))
            if delay > 0:
                await self.feed.wait(worker.topic, delay)


async def expire_due_tasks(ctx: Context, *, limit: int = 100) -> float | None:
    """Move every task past its deadline to `expired`. Returns the pause before the next sweep.

    Instances sharing a database split the due tasks between them (`Store.expire_tasks`)."""
    expired = await ctx.store.expire_tasks(ctx.clock(), limit)
    for applied in expired:
        log.info("task.expired", task_id=applied.task.id, provider=applied.task.provider)
    return 0.0 if len(expired) == limit else None
