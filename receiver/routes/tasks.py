"""Tasks: submit, read (with long-poll), list, callbacks log, cancel, mint callback URLs."""

from __future__ import annotations

import asyncio
import re
from functools import partial
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from receiver.auth import KEY_ID_SCOPE
from receiver.errors import InvalidParameters, InvalidRequest, NotFound, json_response
from receiver.ids import new_id
from receiver.providers import CALLBACK_DIALECTS, TASK_PROVIDERS
from receiver.providers.base import Upload
from receiver.quotas import quotas
from receiver.routes import context, cursors, draining, query_float, query_int, read_fields, read_json_object
from receiver.routes.forms import is_multipart, read_submission_form
from receiver.store.base import TaskQuery
from receiver.submission import submit
from receiver.tasks import Task, cancel
from receiver.types import EventType, TaskState

MAX_WAIT = 60.0
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


async def create_task(request: Request) -> Response:
    ctx = context(request)
    key = request.headers.get("idempotency-key")
    if key is not None and not _IDEMPOTENCY_KEY.match(key):
        raise InvalidRequest("Idempotency-Key must be 1 to 255 printable ASCII characters.")
    uploads: list[Upload] = []
    problems: list[dict[str, str]] = []
    if is_multipart(request):  # the same fields, plus `image` / `image[]` reference files
        body, uploads, problems = await read_submission_form(request, ctx.settings.max_upload_bytes)
    else:
        body = await read_json_object(request)
    scope = request.scope.get(KEY_ID_SCOPE, "")
    task, created = await submit(ctx, body, idempotency_key=key, key_scope=scope, uploads=uploads, problems=problems)
    return json_response(task.to_api(), 202 if created else 200)


async def _task_or_404(request: Request) -> Task:
    task_id = request.path_params["task_id"]
    task = await context(request).store.get_task(task_id)
    if task is None:
        raise NotFound(f"No task {task_id}.", code="task_not_found", details={"task_id": task_id})
    return task


async def get_task(request: Request) -> Response:
    wait = query_float(request, "wait", 0.0, low=0.0, high=MAX_WAIT)
    task = await _task_or_404(request)
    if wait > 0 and not task.terminal:
        release = quotas(request).streams.take(request.scope.get(KEY_ID_SCOPE, ""))  # 429 beyond the cap
        try:
            task = await wait_for_terminal(request, task, wait)
        finally:
            release()
    return json_response(task.to_api())


async def wait_for_terminal(request: Request, task: Task, seconds: float) -> Task:
    """Hold until the task is terminal or `seconds` pass; answers at once on the change, and with
    the task as it is when the server starts to shut down (the client asks again elsewhere).
    A client that goes away ends the wait (and frees its slot: receiver.quotas) at once."""
    feed = context(request).store.feed
    stopping = asyncio.ensure_future(draining(request).wait())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        with feed.listen(task.id) as changes:
            # Read again after listening, so a change committed in between is not missed.
            task = await context(request).store.get_task(task.id) or task
            async with asyncio.timeout(seconds):
                while not task.terminal and not stopping.done() and not gone.done():
                    task = await _next(changes, stopping, gone) or task
    except TimeoutError:
        pass
    finally:
        stopping.cancel()
        gone.cancel()
    return task


async def _disconnected(request: Request) -> None:
    """Return when the client has gone (the body of a GET is empty: what comes next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _next(changes: asyncio.Queue[Task], *stops: asyncio.Future[Any]) -> Task | None:
    """The next change of the task, or None once one of `stops` is done."""
    if not changes.empty():
        return changes.get_nowait()
    getting = asyncio.ensure_future(changes.get())
    try:
        await asyncio.wait({getting, *stops}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        getting.cancel()
    return getting.result() if getting.done() and not getting.cancelled() else None


async def list_tasks(request: Request) -> Response:
    ctx = context(request)
    params = request.query_params
    state = params.get("state") or None
    if state is not None and state not in TaskState.__members__.values():
        raise InvalidRequest(
            f"'state' must be one of: {', '.join(s.value for s in TaskState)}.", details={"field": "state"}
        )
    provider = params.get("provider") or None
    if provider is not None and provider not in TASK_PROVIDERS:
        raise InvalidRequest(f"'provider' must be one of: {', '.join(TASK_PROVIDERS)}.", details={"field": "provider"})
    limit = query_int(request, "limit", 20, low=1, high=100)
    query = TaskQuery(
        upstream_task_id=params.get("upstream_task_id") or None,
        state=TaskState(state) if state else None,
        provider=provider,
        before_id=cursors.decode(params.get("cursor")),
        limit=limit + 1,  # one more: is there a next page?
    )
    tasks, next_cursor = cursors.page(await ctx.store.list_tasks(query), limit)
    return json_response({"data": [t.to_api() for t in tasks], "next_cursor": next_cursor})


async def list_callbacks(request: Request) -> Response:
    task = await _task_or_404(request)
    callbacks = await context(request).store.list_callbacks(task.id)
    return json_response({"data": [c.to_api() for c in callbacks]})


async def cancel_task(request: Request) -> Response:
    ctx = context(request)
    applied = await ctx.store.transition(request.path_params["task_id"], partial(cancel, now=ctx.clock()))
    return json_response(applied.task.to_api())


_CALLBACK_URL_FIELDS = frozenset({"provider", "metadata", "expires_in"})


async def create_callback_url(request: Request) -> Response:
    """A task (state `submitted`) and its signed callback URL, for a task another service submits."""
    ctx = context(request)
    body, problems = await read_fields(request, _CALLBACK_URL_FIELDS)
    provider = body.get("provider", "auto")
    if provider not in CALLBACK_DIALECTS:
        problems.append({"field": "provider", "message": f"must be one of: {', '.join(CALLBACK_DIALECTS)}"})
    metadata = body.get("metadata", {})
    if not isinstance(metadata, dict):
        problems.append({"field": "metadata", "message": "must be an object"})
    expires_in = body.get("expires_in")
    if expires_in is not None and (
        isinstance(expires_in, bool) or not isinstance(expires_in, int) or not 60 <= expires_in <= 31536000
    ):
        problems.append({"field": "expires_in", "message": "must be an integer number of seconds, 60 to 31536000"})
    if problems:
        raise InvalidParameters(problems)
    now = ctx.clock()
    lifetime = expires_in or ctx.settings.callback_max_age
    task = Task(
        id=new_id("tsk", ctx.clock),
        provider=provider,
        model=None,
        state=TaskState.SUBMITTED,
        request={},
        metadata=metadata,
        origin="external",
        created_at=now,
        updated_at=now,
        expires_at=now + (expires_in or ctx.settings.task_timeout),
    )
    created = await ctx.store.create_task(task, events=(EventType.SUBMITTED,))
    url = ctx.callback_url(task.id, dialect=task.provider, max_age=lifetime)
    return json_response({"task": created.task.to_api(), "callback_url": url}, 201)


routes = [
    Route("/tasks", create_task, methods=["POST"]),
    Route("/tasks", list_tasks, methods=["GET"]),
    Route("/tasks/{task_id}", get_task, methods=["GET"]),
    Route("/tasks/{task_id}/callbacks", list_callbacks, methods=["GET"]),
    Route("/tasks/{task_id}/cancel", cancel_task, methods=["POST"]),
    Route("/callback-urls", create_callback_url, methods=["POST"]),
]
