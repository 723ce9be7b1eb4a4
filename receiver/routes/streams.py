"""Server-Sent Events: a task's changes as one long response, for services that
would rather hold a connection than host an endpoint.

    GET /v1/tasks/{id}/events

    id: 2
    event: task.submitted
    data: {"id": "tsk_…", "state": "submitted", "sequence": 2, …}

The task as it is now, then one event per change (`id` is the task's
`sequence`, `event` is `task.<state>`, `data` the task), and the stream ends
after a terminal state — once a succeeded task's images are kept (receiver.mirror):
while they are downloaded it shows `result.mirror: "pending"`, and the task is sent
once more (same `id`) with its asset URLs before the stream ends. A comment
line every `HEARTBEAT` seconds keeps proxies from closing a quiet stream; the
stream also ends when the client goes away or the receiver shuts down.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from receiver.context import Context
from receiver.errors import NotFound
from receiver.routes import context
from receiver.tasks import Task

#: Seconds between comment lines on a quiet stream.
HEARTBEAT = 15.0
#: How long a client waits before reconnecting after the stream broke (milliseconds, sent to it).
RECONNECT_MS = 3000


def frame(task: Task) -> bytes:
    """One SSE event for the task as it is."""
    data = orjson.dumps(task.to_api())
    return b"id: %d\nevent: task.%s\ndata: %s\n\n" % (task.sequence, task.state.value.encode(), data)


async def task_events(request: Request) -> Response:
    ctx = context(request)
    task_id = request.path_params["task_id"]
    if await ctx.store.get_task(task_id) is None:
        raise NotFound(f"No task {task_id}.", code="task_not_found", details={"task_id": task_id})
    draining: asyncio.Event = getattr(request.app.state, "draining", None) or asyncio.Event()
    return StreamingResponse(
        stream(ctx, task_id, draining),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


async def stream(ctx: Context, task_id: str, draining: asyncio.Event) -> AsyncIterator[bytes]:
    """The frames of one task's stream (see the module docstring)."""
    with ctx.store.feed.listen(task_id) as changes:
        # Read after listening, so a change committed in between is not missed.
        task = await ctx.store.get_task(task_id)
        if task is None:
            return
        yield b"retry: %d\n" % RECONNECT_MS + frame(task)
        while not task.terminal or task.mirroring:
            change = await _next_change(changes, draining)
            if draining.is_set():
                yield b": the receiver is shutting down\n\n"
                return
            if change is None:
                yield b": heartbeat\n\n"
            elif change.sequence > task.sequence or (task.mirroring and not change.mirroring):
                task = change
                yield frame(task)


async def _next_change(changes: asyncio.Queue[Task], draining: asyncio.Event) -> Task | None:
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


routes = [Route("/tasks/{task_id}/events", task_events, methods=["GET"])]
