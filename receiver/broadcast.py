"""In-process notifications that something committed.

    with feed.listen(task_id) as changes:      # or listen(None) for every task
        task = await changes.get()

    feed.wake("deliveries")                    # a worker waiting on that topic runs now
    await feed.wait("deliveries", timeout=1.0)

    with feed.watch() as everything:           # every task change, and notices (the dashboard)
        item = await everything.get()          # a Task, or a Notice: callback logged, delivery attempted

Stores publish here after each commit. A backend shared by several processes
(PostgreSQL) also publishes what other instances committed, so long-polls,
SSE streams and workers react whichever instance took the write.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

from receiver.tasks import Task

_QUEUE_SIZE = 256
T = TypeVar("T")

#: Notice kinds: a callback was logged (`id` = cb_…), a delivery was attempted (`id` = dlv_…).
CALLBACK, DELIVERY = "callback", "delivery"


@dataclass(frozen=True, slots=True)
class Notice:
    """Something stored that is not a task change, for watchers: ids only, the details are read."""

    kind: str
    task_id: str | None
    id: str


def _put(queue: asyncio.Queue[T], item: T) -> None:
    if queue.full():  # a slow reader loses the oldest change, never blocks writers
        with suppress(asyncio.QueueEmpty):
            queue.get_nowait()
    queue.put_nowait(item)


class ChangeFeed:
    def __init__(self) -> None:
        self._listeners: dict[str | None, set[asyncio.Queue[Task]]] = {}
        self._watchers: set[asyncio.Queue[Task | Notice]] = set()
        self._topics: dict[str, asyncio.Event] = {}
        self._taker: Callable[[Sequence[Any]], None] | None = None
        self._resender: Callable[[Any], None] | None = None
        self.offer_lease: tuple[str, float] | None = None  # (owner, lease seconds) while a taker listens

    def take_offers(
        self,
        owner: str,
        lease_seconds: float,
        taker: Callable[[Sequence[Any]], None],
        resender: Callable[[Any], None] | None = None,
    ) -> None:
        """Deliveries written from now on that are first in line are leased to `owner` at once and
        handed to `taker` after commit (the local dispatcher), without a claim round trip; one
        asked to be sent again (`Store.retry_delivery`) goes to `resender`, to be sent now."""
        self._taker = taker
        self._resender = resender
        self.offer_lease = (owner, lease_seconds)

    def stop_taking_offers(self) -> None:
        self._taker = None
        self._resender = None
        self.offer_lease = None

    def offer(self, jobs: Sequence[Any]) -> None:
        if self._taker is not None:
            self._taker(jobs)

    def resend(self, job: Any) -> None:
        if self._resender is not None:
            self._resender(job)
        else:
            self.offer([job])

    def publish(self, task: Task) -> None:
        for key in (task.id, None):
            for queue in self._listeners.get(key, ()):
                _put(queue, task)
        for watcher in self._watchers:
            _put(watcher, task)

    def notice(self, kind: str, task_id: str | None, item_id: str) -> None:
        """Tell the watchers that a callback was logged or a delivery attempted (a no-op without any)."""
        if self._watchers:
            notice = Notice(kind, task_id, item_id)
            for watcher in self._watchers:
                _put(watcher, notice)

    @contextmanager
    def watch(self) -> Iterator[asyncio.Queue[Task | Notice]]:
        """Every task change and every notice, as long as the block runs (the dashboard's stream)."""
        queue: asyncio.Queue[Task | Notice] = asyncio.Queue(_QUEUE_SIZE)
        self._watchers.add(queue)
        try:
            yield queue
        finally:
            self._watchers.discard(queue)

    def watcher_count(self) -> int:
        return len(self._watchers)

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
