"""In-process notifications that something committed.

    with feed.listen(task_id) as changes:      # or listen(None) for every task
        task = await changes.get()

    feed.wake("deliveries")                    # a worker waiting on that topic runs now
    await feed.wait("deliveries", timeout=1.0)

Stores publish here after each commit. A backend shared by several processes
(PostgreSQL) also publishes what other instances committed, so long-polls,
SSE streams and workers react whichever instance took the write.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

from receiver.tasks import Task

_QUEUE_SIZE = 256


class ChangeFeed:
    def __init__(self) -> None:
        self._listeners: dict[str | None, set[asyncio.Queue[Task]]] = {}
        self._topics: dict[str, asyncio.Event] = {}
        self._taker: Callable[[Sequence[Any]], None] | None = None
        self.offer_lease: tuple[str, float] | None = None  # (owner, lease seconds) while a taker listens

    def take_offers(self, owner: str, lease_seconds: float, taker: Callable[[Sequence[Any]], None]) -> None:
        """Deliveries written from now on that are first in line are leased to `owner` at once and
        handed to `taker` after commit (the local dispatcher), without a claim round trip."""
        self._taker = taker
        self.offer_lease = (owner, lease_seconds)

    def stop_taking_offers(self) -> None:
        self._taker = None
        self.offer_lease = None

    def offer(self, jobs: Sequence[Any]) -> None:
        if self._taker is not None:
            self._taker(jobs)

    def publish(self, task: Task) -> None:
        for key in (task.id, None):
            for queue in self._listeners.get(key, ()):
                if queue.full():  # a slow reader loses the oldest change, never blocks writers
                    with suppress(asyncio.QueueEmpty):
                        queue.get_nowait()
                queue.put_nowait(task)

    @contextmanager
    def listen(self, task_id: str | None) -> Iterator[asyncio.Queue[Task]]:
        queue: asyncio.Queue[Task] = asyncio.Queue(_QUEUE_SIZE)
        self._listeners.setdefault(task_id, set()).add(queue)
        try:
            yield queue
        finally:
            listeners = self._listeners.get(task_id)
            if listeners is not None:
                listeners.discard(queue)
                if not listeners:
                    del self._listeners[task_id]

    def listener_count(self, task_id: str | None = None) -> int:
        return len(self._listeners.get(task_id, ()))

    def wake(self, topic: str) -> None:
        self._event(topic).set()

    def wake_all(self) -> None:
        """Wake every topic (after a gap in which wake-ups from other instances may have been lost)."""
        for event in self._topics.values():
            event.set()

    async def wait(self, topic: str, timeout: float) -> bool:
        """Wait until `topic` is woken or `timeout` passes; True if woken."""
        event = self._event(topic)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        event.clear()
        return True

    def _event(self, topic: str) -> asyncio.Event:
        event = self._topics.get(topic)
        if event is None:
            event = self._topics[topic] = asyncio.Event()
        return event
