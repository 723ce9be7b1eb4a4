"""Calling a synchronous provider (the router) from a background job, at most once.

    spec = first_call(task)                 # scheduled with the task, created `submitted`
    outcome = await call_once(ctx, job)     # the handler of jobs of that provider's kind

The call can take minutes, so no client waits on it: the task is answered
`202 submitted` at once and the answer is recorded like a callback (in the
task's callback log, marked `x-receiver-source: sync-response`); an error
fails the task as a refusal would.

A call that was sent may have been charged, so it is never sent twice. Before
sending, the job is durably marked `calling` and moved past the call's
timeout; if the receiver dies during the call, whoever claims the job next
finds the mark and fails the task (`call_interrupted`) instead of calling
again. A graceful shutdown fails the task at once, for the same reason.
"""

from __future__ import annotations

import asyncio
from functools import partial

from receiver.context import Context
from receiver.errors import InvalidPayload, ProviderError
from receiver.ingest import record_answer
from receiver.jobs import DONE, Outcome, hand_back
from receiver.logs import get_logger
from receiver.store.base import Job
from receiver.tasks import JobSpec, Task, record_refusal
from receiver.types import JSON

log = get_logger("receiver.sync_calls")

#: Beyond the call's own timeout, before a `calling` mark is taken to mean the caller died.
GRACE = 30.0

INTERRUPTED = {
    "code": "call_interrupted",
    "message": "The receiver stopped while waiting for the provider's answer. The call is not repeated, "
    "because the provider may already have charged for it; submit the task again if you want another try.",
}


def first_call(task: Task) -> JobSpec:
    """The job that makes `task`'s call, due at once (its kind is the provider's name)."""
    return JobSpec(task.provider, task.created_at, {"phase": "pending"})


async def call_once(ctx: Context, job: Job) -> Outcome:
    task = await ctx.store.get_task(job.task_id)
    if task is None or task.terminal:
        return DONE
    provider = ctx.providers.sync(task.provider)
    if provider is None:
        log.warning("sync_call.impossible", task_id=task.id, provider=task.provider)
        return DONE
    if job.payload.get("phase") == "calling":
        log.warning("sync_call.interrupted", task_id=task.id, provider=task.provider)
        await _fail(ctx, task.id, INTERRUPTED)
        return DONE
    now = ctx.clock()
    timeout = min(ctx.settings.router_timeout, task.expires_at - now)
    if timeout <= 0:
        return DONE  # past the deadline: expiry takes over
    # Durable before the request leaves: from here on, this call is never made again.
    mark = {"phase": "calling", "started_at": now, "timeout": timeout}
    hand_back()  # the mark releases the lease: the job's run_at, past the call, now keeps others off it
    await ctx.store.finish_job(job.id, reschedule_at=now + timeout + GRACE, payload=mark)
    log.info("sync_call.sent", task_id=task.id, provider=task.provider, timeout=round(timeout, 3))
    try:
        answer = await provider.generate(task, timeout=timeout)
        report = provider.read(answer.payload)
    except ProviderError as exc:
        ctx.metrics.submissions.labels(task.provider, "refused").inc()
        log.warning("sync_call.refused", task_id=task.id, provider=task.provider, code=exc.code, status=exc.status_code)
        await _fail(ctx, task.id, exc.as_task_error())
        return DONE
    except InvalidPayload as exc:
        log.warning("sync_call.garbled", task_id=task.id, provider=task.provider, error=str(exc)[:300])
        await _fail(ctx, task.id, _garbled(task.provider, str(exc)))
        return DONE
    except asyncio.CancelledError:
        await asyncio.shield(_fail(ctx, task.id, INTERRUPTED))
        raise
    ctx.metrics.submissions.labels(task.provider, "accepted").inc()
    try:
        await record_answer(ctx, task.id, answer, "sync-response", report)
    except InvalidPayload as exc:  # an inline image that does not decode
        await _fail(ctx, task.id, _garbled(task.provider, str(exc)))
    return DONE


def _garbled(provider: str, message: str) -> JSON:
    return ProviderError(f"{provider}: {message}", provider=provider, code="upstream_garbled").as_task_error()


async def _fail(ctx: Context, task_id: str, error: JSON) -> None:
    await ctx.store.transition(task_id, partial(record_refusal, error=error, now=ctx.clock()))
