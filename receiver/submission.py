"""Submitting a task: validate, store (queued), submit upstream, record the answer.

The task is durable before the provider hears of it, and the callback URL
names our task, so a provider fast enough to call back before its own answer
arrives still finds the task.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping, Sequence
from functools import partial

import orjson

from receiver.context import Context
from receiver.errors import Conflict, ProviderError, ProviderRefused
from receiver.ids import new_id
from receiver.logs import get_logger
from receiver.mirror import marked
from receiver.polling import first_poll
from receiver.providers.base import Upload
from receiver.providers.catalog import ValidatedRequest, validate
from receiver.store.base import IdempotencyKey, Subscription
from receiver.sync_calls import first_call
from receiver.tasks import MAX_UPSTREAM_ID, Task, apply_report, record_refusal, record_submission, unusable_upstream_id
from receiver.types import JSON, EventType, TaskState

log = get_logger("receiver.submission")


def fingerprint(body: JSON, uploads: Sequence[Upload] = ()) -> str:
    """A digest of a submission, to tell a retried request from a different one."""
    digest = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS))
    for upload in uploads:
        digest.update(upload.field.encode() + b"\0" + hashlib.sha256(upload.data).digest())
    return digest.hexdigest()


def new_task(ctx: Context, request: ValidatedRequest, state: TaskState = TaskState.QUEUED) -> Task:
    now = ctx.clock()
    return Task(
        id=new_id("tsk", ctx.clock),
        provider=request.provider,
        model=request.model,
        state=state,
        request=request.request(),
        metadata=request.metadata,
        notify_url=request.notify_url,
        warnings=request.warnings,
        created_at=now,
        updated_at=now,
        expires_at=now + ctx.settings.task_timeout,
    )


def notify_subscription(ctx: Context, task: Task) -> Subscription | None:
    """A task's notify_url, as a subscription to that task alone."""
    if task.notify_url is None:
        return None
    return Subscription(
        id=new_id("sub", ctx.clock),
        url=task.notify_url,
        events=("*",),
        secret="",
        uses_notify_secret=True,
        task_id=task.id,
        description=f"notify_url of {task.id}",
        created_at=task.created_at,
        updated_at=task.created_at,
    )


async def submit(
    ctx: Context,
    body: JSON,
    *,
    idempotency_key: str | None = None,
    key_scope: str = "",
    uploads: Sequence[Upload] = (),
    problems: Sequence[Mapping[str, str]] = (),
) -> tuple[Task, bool]:
    """Submit a task; returns (task, created). Raises InvalidParameters, UrlNotAllowed, Conflict,
    ProviderRefused.

    A synchronous provider (the router) is not called here: its task is created `submitted`
    together with the background job that makes the call (receiver/sync_calls.py).
    """
    request = validate(body, uploads, problems=problems)
    if request.notify_url is not None:
        await ctx.url_guard.check(request.notify_url, field="notify_url")
    background = ctx.providers.sync(request.provider) is not None
    task = new_task(ctx, request, TaskState.SUBMITTED if background else TaskState.QUEUED)
    idempotency = None
    if idempotency_key is not None:
        idempotency = IdempotencyKey(f"{key_scope}:{idempotency_key}", fingerprint(body, uploads))
    created = await ctx.store.create_task(
        task,
        idempotency=idempotency,
        notify_subscription=notify_subscription(ctx, task),
        jobs=(first_call(task),) if background else (),
        events=(EventType.SUBMITTED,) if background else (),
    )
    if not created.created:
        if not created.same_request:
            raise Conflict(
                "This Idempotency-Key was used with a different request.",
                code="idempotency_conflict",
                details={"task_id": created.task.id},
            )
        return await _settled(ctx, created.task), False
    if background:
        log.info("task.submitted", task_id=task.id, provider=task.provider, mode="background call")
        return created.task, True
    # The upstream call and its recording finish even if the client goes away.
    return await asyncio.shield(_send(ctx, task, request.uploads)), True


async def _send(ctx: Context, task: Task, uploads: Sequence[Upload]) -> Task:
    provider = ctx.providers.get(task.provider)
    try:
        submission = await provider.submit(task, ctx.callback_url(task.id, dialect=provider.dialect), uploads)
        if unusable_upstream_id(submission.upstream_task_id):
            raise ProviderError(
                f"{task.provider} answered with a task id the receiver cannot keep"
                f" (more than {MAX_UPSTREAM_ID} characters, or a NUL).",
                provider=task.provider,
                code="upstream_garbled",
            )
    except ProviderError as exc:
        ctx.metrics.submissions.labels(task.provider, "refused").inc()
        log.warning("task.refused", task_id=task.id, provider=task.provider, code=exc.code, status=exc.status_code)
        error = exc.as_task_error()
        applied = await ctx.store.transition(task.id, partial(record_refusal, error=error, now=ctx.clock()))
        raise ProviderRefused(exc, applied.task.to_api()) from exc
    ctx.metrics.submissions.labels(task.provider, "accepted").inc()
    upstream = submission.upstream_task_id
    poll_url = submission.poll_url if submission.report is None else None

    now = ctx.clock()
    jobs = (first_poll(ctx.settings, poll_url, now=now),) if poll_url else ()
    applied = await ctx.store.transition(
        task.id, partial(record_submission, upstream_task_id=upstream, now=now, jobs=jobs)
    )
    log.info("task.submitted", task_id=task.id, provider=task.provider, upstream_task_id=upstream)
    report = submission.report
    if report is not None:
        report = marked(ctx.settings, report)
        applied = await ctx.store.transition(task.id, partial(apply_report, report=report, now=ctx.clock()))
    return applied.task


async def _settled(ctx: Context, task: Task) -> Task:
    """An idempotent retry while the first request is still talking to the provider
    waits (bounded) until the task has left `queued`."""
    deadline = ctx.settings.provider_timeout + 5
    with ctx.store.feed.listen(task.id) as changes:
        current = await ctx.store.get_task(task.id) or task
        try:
            async with asyncio.timeout(deadline):
                while current.state is TaskState.QUEUED:
                    current = await changes.get()
        except TimeoutError:
            pass
    return current
