"""Polling a provider's task until it is terminal (Xenodia), with a growing delay.

    spec = first_poll(settings, poll_url, now=now)   # scheduled with the submission's recording
    outcome = await poll_once(ctx, job)             # the "poll" job's handler

The schedule is the job row (`run_at`, and `delay` in its payload), so a
restart resumes polling where it stopped. The delay starts at
RECEIVER_POLL_INTERVAL and grows by half (x1.5) per poll up to RECEIVER_POLL_MAX_INTERVAL.
A poll that fails (5xx, a timeout, garbage, an answer about another task or in
another dialect) is logged and tried again later:
it never fails the task by itself. Polling stops at the task's deadline, where
expiry takes over.

An answer is recorded (callback log + state, as a callback would be) only when
its state differs from the last one recorded, so a task that waits for an hour
does not fill its log with identical "waiting" answers. A failed poll is shown
in the task's callback log too (`verdict: ignored`, `reason: poll_failed`, the
body `{"error": {code, message, status_code?, body?}}`, header
`x-receiver-source: poll`), once per kind of failure in a row: what a user
debugging a stuck task looks at, rather than the receiver's own logs.
"""

from __future__ import annotations

from typing import Any

import orjson

from receiver.config import Settings
from receiver.context import Context
from receiver.errors import InvalidPayload, ProviderError, ReceiverError, TaskMismatch
from receiver.ingest import SOURCE_HEADER, record, record_answer
from receiver.jobs import DONE, Outcome, again
from receiver.logs import get_logger
from receiver.store.base import Job
from receiver.tasks import JobSpec, Report
from receiver.types import TaskState

log = get_logger("receiver.polling")

KIND = "poll"
#: The callback log's reason for a poll that failed (an error status, a timeout, garbage).
POLL_FAILED = "poll_failed"
GROWTH = 1.5


def first_poll(settings: Settings, poll_url: str, *, now: float) -> JobSpec:
    """The first poll of a task just accepted, one interval from now."""
    payload = {"poll_url": poll_url, "delay": settings.poll_interval, "reported": TaskState.SUBMITTED.value}
    return JobSpec(KIND, now + settings.poll_interval, payload)


def next_delay(delay: float, settings: Settings) -> float:
    return min(max(delay, settings.poll_interval) * GROWTH, settings.poll_max_interval)


async def poll_once(ctx: Context, job: Job) -> Outcome:
    task = await ctx.store.get_task(job.task_id)
    if task is None or task.terminal:
        return DONE
    if ctx.clock() >= task.expires_at:
        log.info("poll.stopped", task_id=task.id, reason="past the task's deadline; expiry takes over")
        return DONE
    poller = ctx.providers.poller(task.provider)
    poll_url = job.payload.get("poll_url")
    if poller is None or not isinstance(poll_url, str):
        log.warning("poll.stopped", task_id=task.id, provider=task.provider, reason="nothing to poll")
        return DONE
    delay = next_delay(float(job.payload.get("delay", ctx.settings.poll_interval)), ctx.settings)
    payload = {**job.payload, "delay": delay}
    attempt = job.attempts + 1
    applied = None
    try:
        answer, report = await poller.poll(poll_url)
        changed = report.state.value != job.payload.get("reported")
        # An answer about another task is recorded (and refused: TaskMismatch) even in an unchanged state.
        if changed or report.upstream_task_id not in (None, task.upstream_task_id):
            applied = await record_answer(ctx, task.id, answer, "poll", report)
    except (ProviderError, InvalidPayload, TaskMismatch) as exc:  # unreachable, garbage, or not this task
        log.warning(
            "poll.failed",
            task_id=task.id,
            provider=task.provider,
            attempt=attempt,
            code=exc.code,
            status=exc.status_code if isinstance(exc, ProviderError) else None,
            error=str(exc)[:300],
            retry_in=round(delay, 3),
        )
        payload = {**payload, "failures": int(payload.get("failures", 0)) + 1}
        if payload.get("failed_with") != exc.code:  # shown once per kind of failure in a row, not every poll
            await _log_failure(ctx, task.id, exc)
            payload["failed_with"] = exc.code
        return again(ctx.clock() + delay, payload)
    payload.pop("failed_with", None)
    log.info("poll.answered", task_id=task.id, provider=task.provider, attempt=attempt, state=report.state.value)
    if applied is not None:
        if applied.task.terminal:
            return DONE
        payload["reported"] = report.state.value
    return again(ctx.clock() + delay, payload)


async def _log_failure(ctx: Context, task_id: str, exc: ProviderError | InvalidPayload | TaskMismatch) -> None:
    """Put a failed poll in the task's callback log, where the dashboard and the API show it."""
    error: dict[str, Any] = {"code": exc.code, "message": str(exc)[:500]}
    if isinstance(exc, ProviderError):  # what the provider answered, if it answered
        if exc.status_code is not None:
            error["status_code"] = exc.status_code
        if exc.body is not None:
            error["body"] = exc.body[:1024] if isinstance(exc.body, str) else exc.body
    headers = {"content-type": "application/json", SOURCE_HEADER: "poll"}
    report = Report(TaskState.SUBMITTED, unusable=POLL_FAILED)
    try:
        await record(ctx, task_id, orjson.dumps({"error": error}), headers, report)
    except ReceiverError as failed:  # the log is for people; polling goes on regardless
        log.warning("poll.failure_not_logged", task_id=task_id, error=str(failed)[:300])
