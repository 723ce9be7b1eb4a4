"""Server-Sent Events: a task's changes as one long response, for services that
would rather hold a connection than host an endpoint; and everything, for the dashboard.

    GET /v1/tasks/{id}/events

    id: 2
    event: task.submitted
    data: {"id": "tsk_…", "state": "submitted", "sequence": 2, …}

The task as it is now, then one event per change (`id` is the task's
`sequence`, `event` is `task.<state>`, `data` the task; a client reconnecting
with `Last-Event-ID` gets only what is newer, and `204` once it has the last), and the stream ends
after a terminal state — once a succeeded task's images are kept (receiver.mirror):
while they are downloaded it shows `result.mirror: "pending"`, and the task is sent
once more (same `id`) with its asset URLs before the stream ends.

    GET /v1/stream                 (the dashboard's live view: every change, every instance)

    event: task                    data: the task, at each change of any task
    event: callback                data: {"task_id", "id"} — a callback was logged (read it from the API)
    event: delivery                data: {"task_id", "id"} — a delivery was attempted or queued again

It starts with `event: ready` once it listens (read what you show after it, so
nothing falls in between). At most a few at once per API key (429
`too_many_streams`, receiver.quotas.DASHBOARD_STREAMS_PER_KEY); every stream also
holds one of the key's slots for long-lived requests (`RECEIVER_MAX_STREAMS_PER_KEY`).
A comment line every `HEARTBEAT` seconds keeps proxies from closing a quiet
stream; streams also end when the client goes away or the receiver shuts down.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from receiver.auth import KEY_ID_SCOPE
from receiver.broadcast import Notice
from receiver.context import Context
from receiver.errors import NotFound
from receiver.quotas import quotas
from receiver.routes import context, draining
from receiver.tasks import Task

T = TypeVar("T")

#: Seconds between comment lines on a quiet stream.
HEARTBEAT = 15.0
#: How long a client waits before reconnecting after the stream broke (milliseconds, sent to it).
RECONNECT_MS = 3000
_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def frame(task: Task) -> bytes:
    """One SSE event for the task as it is."""
    data = orjson.dumps(task.to_api())
    return b"id: %d\nevent: task.%s\ndata: %s\n\n" % (task.sequence, task.state.value.encode(), data)


async def task_events(request: Request) -> Response:
    ctx = context(request)
    task_id = request.path_params["task_id"]
    task = await ctx.store.get_task(task_id)
    if task is None:
        raise NotFound(f"No task {task_id}.", code="task_not_found", details={"task_id": task_id})
    seen = last_event_id(request)
    if seen is not None and seen >= task.sequence and _settled(task):
        # A client reconnecting after the last event (EventSource does, after every close): 204
        # is the answer that tells it to stop, and takes none of the key's stream slots.
        return Response(status_code=204)
    release = quotas(request).streams.take(request.scope.get(KEY_ID_SCOPE, ""))
    return _Counted(stream(ctx, task_id, draining(request), seen=seen), release)


def last_event_id(request: Request) -> int | None:
    """The `Last-Event-ID` a reconnecting client sends: the `sequence` it saw last (None: none, or
    not one of ours)."""
    value = request.headers.get("last-event-id", "").strip()
    if not (value.isascii() and value.isdigit()):
        return None
    # Past 18 digits it is past every sequence (and int() refuses more than 4,300 digits).
    return int(value) if len(value) <= 18 else _PAST_EVERY_SEQUENCE


_PAST_EVERY_SEQUENCE = 10**18


def _settled(task: Task) -> bool:
    return task.terminal and not task.mirroring


async def stream(
    ctx: Context, task_id: str, draining: asyncio.Event, *, seen: int | None = None
) -> AsyncIterator[bytes]:
    """The frames of one task's stream (see the module docstring); after `seen` (a reconnecting
    client's Last-Event-ID), the task as it is now is sent only if it is newer."""
    with ctx.store.feed.listen(task_id) as changes:
        # Read after listening, so a change committed in between is not missed.
        task = await ctx.store.get_task(task_id)
        if task is None:
            return
        if seen is not None and seen >= task.sequence:
            yield b"retry: %d\n\n" % RECONNECT_MS  # the client has this one: only what follows
            if _settled(task):
                return
        else:
            yield b"retry: %d\n" % RECONNECT_MS + frame(task)
        while not _settled(task):
            change = await _next_change(changes, draining)
            if draining.is_set():
                yield b": the receiver is shutting down\n\n"
                return
            if change is None:
                yield b": heartbeat\n\n"
            elif change.sequence > task.sequence or (task.mirroring and not change.mirroring):
                task = change
                yield frame(task)


async def _next_change(changes: asyncio.Queue[T], draining: asyncio.Event) -> T | None:
    """The next change, or None after a quiet heartbeat interval (or when draining starts)."""
    if not changes.empty():
        return changes.get_nowait()
    getting = asyncio.ensure_future(changes.get())
    stopping = asyncio.ensure_future(draining.wait())
    try:
        await asyncio.wait({getting, stopping}, timeout=HEARTBEAT, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        getting.cancel()
    if getting.done() and not getting.cancelled():
        return getting.result()
    return None


async def activity(request: Request) -> Response:
    """`GET /v1/stream`: every task change, callback and delivery attempt (see the module docstring)."""
    ctx = context(request)
    key = request.scope.get(KEY_ID_SCOPE, "")
    limits = quotas(request)
    release_tab = limits.dashboard_streams.take(key)
    try:
        release_slot = limits.streams.take(key)  # the cap on every long-lived request of the key
    except Exception:
        release_tab()
        raise

    def release() -> None:
        release_slot()
        release_tab()

    return _Counted(activity_stream(ctx, draining(request)), release)


class _Counted(StreamingResponse):
    """A stream whose slot is released however the response ends (even one never started)."""

    def __init__(self, content: AsyncIterator[bytes], release: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=_HEADERS)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


async def activity_stream(ctx: Context, draining: asyncio.Event) -> AsyncIterator[bytes]:
    with ctx.store.feed.watch() as changes:
        yield b"retry: %d\nevent: ready\ndata: {}\n\n" % RECONNECT_MS
        while True:
            change = await _next_change(changes, draining)
            if draining.is_set():
                yield b": the receiver is shutting down\n\n"
                return
            if change is None:
                yield b": heartbeat\n\n"
            elif isinstance(change, Notice):
                data = orjson.dumps({"task_id": change.task_id, "id": change.id})
                yield b"event: %s\ndata: %s\n\n" % (change.kind.encode(), data)
            else:
                yield b"event: task\ndata: %s\n\n" % orjson.dumps(change.to_api())


routes = [
    Route("/tasks/{task_id}/events", task_events, methods=["GET"]),
    Route("/stream", activity, methods=["GET"]),
]
