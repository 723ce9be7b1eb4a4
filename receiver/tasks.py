"""Tasks: the value object, the state machine, and what a provider report does.

Every way a result arrives (a callback, a poll, a synchronous answer) becomes
a `Report`; `apply_report` decides, without I/O, what it does to the task. The
stores run these decisions inside their transactions, so every backend makes
the same choices.

    queued ─▶ submitted ─▶ running ─▶ succeeded | failed | expired | cancelled
       └──────────┴───────────┴──▶ (any terminal state)

`sequence` grows by one at every state change; terminal states never change.
A success whose images are to be kept (receiver.mirror) is stored at once but
announced later: `keep_images` ends the mirroring and emits the held
`task.succeeded`, with the same `sequence`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from receiver.clock import isoformat
from receiver.errors import Conflict, InvalidPayload, TaskMismatch
from receiver.types import JSON, EventType, TaskState, Value, Verdict

_NEXT: dict[TaskState, frozenset[TaskState]] = {
    TaskState.QUEUED: frozenset(TaskState) - {TaskState.QUEUED},
    TaskState.SUBMITTED: frozenset(TaskState) - {TaskState.QUEUED, TaskState.SUBMITTED},
    TaskState.RUNNING: frozenset(TaskState) - {TaskState.QUEUED, TaskState.SUBMITTED, TaskState.RUNNING},
}


class IllegalTransition(ValueError):
    """A state change the state machine does not allow."""


@dataclass(frozen=True, slots=True)
class Task(Value):
    """A generation task as stored. `to_api()` gives the contract's JSON shape."""

    id: str
    provider: str
    model: str | None
    state: TaskState
    request: JSON
    created_at: float
    updated_at: float
    expires_at: float
    sequence: int = 1
    upstream_task_id: str | None = None
    result: JSON | None = None
    error: JSON | None = None
    metadata: JSON = field(default_factory=dict)
    completed_at: float | None = None
    notify_url: str | None = None
    warnings: tuple[str, ...] = ()
    origin: str = "api"  # "api": submitted by us; "external": POST /v1/callback-urls

    @property
    def terminal(self) -> bool:
        return self.state.terminal

    @property
    def mirroring(self) -> bool:
        """Succeeded, its images still being kept (receiver.mirror): its `task.succeeded` waits."""
        return self.result is not None and self.result.get("mirror") == MIRROR_PENDING

    def to_api(self) -> JSON:
        return {
            "id": self.id,
            "provider": self.provider,
            "model": self.model,
            "state": self.state.value,
            "upstream_task_id": self.upstream_task_id,
            "request": self.request,
            "result": self.result,
            "error": self.error,
            "metadata": self.metadata,
            "sequence": self.sequence,
            "notify_url": self.notify_url,
            "warnings": list(self.warnings),
            "created_at": isoformat(self.created_at),
            "updated_at": isoformat(self.updated_at),
            "completed_at": isoformat(self.completed_at),
            "expires_at": isoformat(self.expires_at),
        }


@dataclass(frozen=True, slots=True)
class Report(Value):
    """What a provider said about a task, in any dialect, normalised.

    `state` is one of submitted, running, succeeded, failed (or cancelled when
    the provider cancelled it). `images` are dicts with at least `url`.
    `warnings` are added to the task, once each (not by a duplicate or to a terminal task).
    """

    state: TaskState
    upstream_task_id: str | None = None
    images: tuple[JSON, ...] = ()
    error: JSON | None = None
    progress: float | None = None
    dialect: str | None = None
    warnings: tuple[str, ...] = ()
    mirror: bool = False  # keep the images (receiver.mirror) before the success is announced
    unusable: str | None = None  # an answer that says nothing usable (a failed poll): logged with this reason

    @property
    def has_inline_images(self) -> bool:
        """Does an image carry its bytes (`b64_json`) rather than a URL?"""
        return any("b64_json" in image for image in self.images)

    def with_warning(self, warning: str) -> Report:
        return self.replace(warnings=(*self.warnings, warning))

    def result(self) -> JSON | None:
        if self.state is not TaskState.SUCCEEDED:
            return None
        # Every image has the contract's keys, null where the provider has no value.
        return {"images": [{"revised_prompt": None, "asset_url": None, **image} for image in self.images]}


#: The job that keeps a succeeded task's images (receiver.mirror), and `result.mirror`'s values.
MIRROR = "mirror"
MIRROR_PENDING, MIRROR_DONE, MIRROR_FAILED = "pending", "done", "failed"


@dataclass(frozen=True, slots=True)
class JobSpec:
    """Background work a decision schedules for its task (one per kind and task)."""

    kind: str
    run_at: float
    payload: JSON = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Transition(Value):
    """The outcome of a decision: the task to write (None: unchanged), events to emit
    and jobs to schedule. When the task turns terminal, its other jobs are dropped."""

    task: Task | None
    events: tuple[EventType, ...] = ()
    verdict: Verdict = Verdict.ACCEPTED
    reason: str | None = None
    jobs: tuple[JobSpec, ...] = ()

    def with_jobs(self, *jobs: JobSpec) -> Transition:
        return self.replace(jobs=self.jobs + jobs)

    def with_events(self, events: tuple[EventType, ...]) -> Transition:
        return self.replace(events=events)

    @property
    def changed(self) -> bool:
        return self.task is not None


def advance(task: Task, state: TaskState, *, now: float, **changes: Any) -> Task:
    """`task` moved to `state`: sequence + 1, timestamps set; IllegalTransition if not allowed."""
    if state not in _NEXT.get(task.state, frozenset()):
        raise IllegalTransition(f"{task.id}: {task.state} -> {state} is not allowed")
    return task.replace(
        state=state,
        sequence=task.sequence + 1,
        updated_at=now,
        completed_at=now if state.terminal else None,
        **changes,
    )


def _moved(task: Task, state: TaskState, *, now: float, **changes: Any) -> Transition:
    new = advance(task, state, now=now, **changes)
    event = EventType.for_state(state)
    return Transition(new, (event,) if event else ())


#: The longest upstream task id a task takes (providers' ids are a few dozen characters;
#: PostgreSQL cannot index much more than 2 KiB in `tasks_upstream`).
MAX_UPSTREAM_ID = 256


def unusable_upstream_id(named: str | None) -> bool:
    """An upstream id no database can hold or index alike: a NUL (PostgreSQL text refuses it) or
    more than MAX_UPSTREAM_ID characters."""
    return named is not None and (len(named) > MAX_UPSTREAM_ID or "\x00" in named)


def apply_report(task: Task, report: Report, *, now: float, duplicate: bool = False) -> Transition:
    """Decide what `report` does to `task`.

    Raises TaskMismatch when the report names another upstream task than the
    one already bound to `task`, and InvalidPayload when it is written in another
    dialect than the task's provider speaks or would bind the task to an upstream
    id no database keeps alike (`unusable_upstream_id`; a 400, never a 503 that has
    the provider retry) — the request is refused and nothing stored.
    """
    if report.dialect is not None and task.provider != "auto" and report.dialect != task.provider:
        raise InvalidPayload(
            f"Task {task.id} takes {task.provider} callbacks; this payload is {report.dialect}.",
            details={"task_id": task.id, "provider": task.provider, "dialect": report.dialect},
        )
    if report.unusable is not None:  # kept in the callback log for people to see; the task is unchanged
        return Transition(None, verdict=Verdict.IGNORED, reason=report.unusable)
    if duplicate:
        return Transition(None, verdict=Verdict.DUPLICATE, reason="duplicate")
    named = report.upstream_task_id
    if named is not None and task.upstream_task_id is not None and named != task.upstream_task_id:
        raise TaskMismatch(task.id, task.upstream_task_id, named)
    adopt: dict[str, Any] = {}
    if named is not None and task.upstream_task_id is None and not task.terminal:  # a terminal task binds nothing
        if unusable_upstream_id(named):
            raise InvalidPayload(
                f"The upstream task id must be at most {MAX_UPSTREAM_ID} characters, without NUL.",
                details={"limit": MAX_UPSTREAM_ID},
            )
        adopt["upstream_task_id"] = named
    if report.dialect and task.provider == "auto":
        adopt["provider"] = report.dialect
    new_warnings = tuple(w for w in dict.fromkeys(report.warnings) if w not in task.warnings)
    if new_warnings:
        adopt["warnings"] = (*task.warnings, *new_warnings)

    if task.terminal:
        if not report.state.terminal:
            reason = "late"
        elif report.state == task.state and _urls(report.result()) == _urls(task.result):
            reason = "repeat"
        else:
            reason = "conflict"
        return Transition(None, verdict=Verdict.IGNORED, reason=reason)

    if report.state.terminal:
        moved = _moved(task, report.state, now=now, result=report.result(), error=report.error, **adopt)
        return _held_for_mirroring(moved, now=now) if report.mirror else moved
    if report.state is TaskState.RUNNING and task.state is not TaskState.RUNNING:
        return _moved(task, TaskState.RUNNING, now=now, **adopt)
    if report.state is TaskState.SUBMITTED and task.state is TaskState.QUEUED:
        return _moved(task, TaskState.SUBMITTED, now=now, **adopt)
    # Progress that changes no state: kept in the callback log, the task only
    # learns its upstream id if it did not know it yet.
    return Transition(task.replace(updated_at=now, **adopt) if adopt else None)


def _held_for_mirroring(transition: Transition, *, now: float) -> Transition:
    """A success whose images are to be kept: stored at once, marked `mirror: pending`, its event
    held back and a mirror job scheduled in the same transaction (`keep_images` ends it)."""
    new = transition.task
    if new is None or new.state is not TaskState.SUCCEEDED or new.result is None:
        return transition
    if not any(wants_mirroring(image) for image in new.result.get("images", [])):
        return transition  # nothing to download (images the receiver already serves)
    held = new.replace(result={**new.result, "mirror": MIRROR_PENDING})
    return Transition(held, (), jobs=(JobSpec(MIRROR, now),))


def wants_mirroring(image: Mapping[str, Any]) -> bool:
    """An image with a URL of its own and no copy at the receiver yet."""
    return isinstance(image.get("url"), str) and not image.get("asset_url")


def keep_images(task: Task, images: Sequence[JSON], *, now: float) -> Transition:
    """Mirroring ended: write the images (with `asset_url`, or `asset_error` for those that could
    not be kept) and announce the success held back. Once only: a task no longer `mirroring` is
    left alone, so a job that runs twice never sends a second `task.succeeded`."""
    if not task.mirroring or task.result is None:
        return Transition(None, verdict=Verdict.IGNORED, reason="not mirroring")
    failed = [(i, image["asset_error"]) for i, image in enumerate(images) if image.get("asset_error")]
    warnings = tuple(
        f"image {i} was not kept ({error.get('code')}): {error.get('message')}"
        for i, error in failed
        if isinstance(error, Mapping)
    )
    result = {**task.result, "images": [dict(image) for image in images]}
    result["mirror"] = MIRROR_FAILED if failed else MIRROR_DONE
    new = task.replace(result=result, updated_at=now, warnings=(*task.warnings, *warnings))
    return Transition(new, (EventType.SUCCEEDED,))


def record_submission(
    task: Task, upstream_task_id: str | None, *, now: float, jobs: Sequence[JobSpec] = ()
) -> Transition:
    """The provider accepted the task. A callback may already have moved it on.

    `jobs` (e.g. the first poll) are scheduled with it, unless the task is already terminal.
    """
    if task.upstream_task_id is None and upstream_task_id is not None:
        adopt = {"upstream_task_id": upstream_task_id}
    else:
        adopt = {}
    if task.state is TaskState.QUEUED:
        return _moved(task, TaskState.SUBMITTED, now=now, **adopt).with_jobs(*jobs)
    if task.terminal:
        return Transition(task.replace(updated_at=now, **adopt) if adopt else None)
    if adopt or jobs:
        return Transition(task.replace(updated_at=now, **adopt), jobs=tuple(jobs))
    return Transition(None)


def record_refusal(task: Task, error: Mapping[str, Any], *, now: float) -> Transition:
    """The provider refused the task (or could not be reached)."""
    if task.terminal:
        return Transition(None, verdict=Verdict.IGNORED, reason="already terminal")
    return _moved(task, TaskState.FAILED, now=now, error=dict(error))


def cancel(task: Task, *, now: float) -> Transition:
    """The client gave up on the task; late callbacks will be ignored."""
    if task.terminal:
        raise Conflict(
            f"Task {task.id} is already {task.state}; terminal states never change.",
            code="task_terminal",
            details={"task_id": task.id, "state": task.state.value},
        )
    return _moved(task, TaskState.CANCELLED, now=now)


def expire(task: Task, *, now: float) -> Transition:
    """No result arrived in time."""
    if task.terminal or task.expires_at > now:
        return Transition(None, verdict=Verdict.IGNORED, reason="not due")
    error = {"code": "task_timeout", "message": "No result arrived before the task's deadline."}
    return _moved(task, TaskState.EXPIRED, now=now, error=error)


def add_warnings(task: Task, warnings: Sequence[str]) -> Task:
    return task.replace(warnings=tuple(task.warnings) + tuple(warnings))


def _urls(result: JSON | None) -> list[Any]:
    return [image.get("url") for image in (result or {}).get("images", [])]
