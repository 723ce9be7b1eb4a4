from __future__ import annotations

from dataclasses import dataclass

import pytest

from receiver.errors import Conflict, TaskMismatch
from receiver.tasks import (
    MIRROR,
    IllegalTransition,
    JobSpec,
    Report,
    Task,
    advance,
    apply_report,
    cancel,
    expire,
    keep_images,
    record_refusal,
    record_submission,
)
from receiver.types import EventType, TaskState, Value, Verdict

NOW = 1_800_000_000.0
IMAGE = {"url": "https://cdn.example/a.png"}


def task(state: TaskState = TaskState.SUBMITTED, **changes) -> Task:
    base = Task(
        id="tsk_1",
        provider="xhuoapi",
        model="gpt-image-2",
        state=state,
        request={"prompt": "p"},
        created_at=NOW,
        updated_at=NOW,
        expires_at=NOW + 3600,
        sequence=2,
        upstream_task_id="up-1",
    )
    return base.replace(**changes)


def test_advance_bumps_sequence_and_stamps_completion() -> None:
    done = advance(task(), TaskState.SUCCEEDED, now=NOW + 5)
    assert (done.sequence, done.updated_at, done.completed_at) == (3, NOW + 5, NOW + 5)
    running = advance(task(), TaskState.RUNNING, now=NOW + 1)
    assert running.completed_at is None


@pytest.mark.parametrize("terminal", [s for s in TaskState if s.terminal], ids=str)
@pytest.mark.parametrize("target", list(TaskState), ids=str)
def test_terminal_states_never_change(terminal: TaskState, target: TaskState) -> None:
    with pytest.raises(IllegalTransition):
        advance(task(terminal), target, now=NOW)


def test_no_going_back() -> None:
    with pytest.raises(IllegalTransition):
        advance(task(TaskState.RUNNING), TaskState.SUBMITTED, now=NOW)
    with pytest.raises(IllegalTransition):
        advance(task(TaskState.SUBMITTED), TaskState.QUEUED, now=NOW)


def test_success_report_finishes_the_task() -> None:
    t = apply_report(task(), Report(TaskState.SUCCEEDED, "up-1", images=(IMAGE,)), now=NOW)
    assert t.task is not None and t.task.state is TaskState.SUCCEEDED
    # Every image has the contract's keys, null where the provider gave no value.
    assert t.task.result == {"images": [{"url": IMAGE["url"], "revised_prompt": None, "asset_url": None}]}
    assert t.events == (EventType.SUCCEEDED,)
    assert t.verdict is Verdict.ACCEPTED


def test_failure_report_keeps_the_error() -> None:
    error = {"code": "api_error", "message": "fetch failed"}
    t = apply_report(task(), Report(TaskState.FAILED, None, error=error), now=NOW)
    assert t.task is not None and t.task.error == error and t.events == (EventType.FAILED,)


def test_progress_moves_to_running_once() -> None:
    first = apply_report(task(), Report(TaskState.RUNNING, "up-1"), now=NOW)
    assert first.task is not None and first.task.state is TaskState.RUNNING and first.events == (EventType.RUNNING,)
    again = apply_report(first.task, Report(TaskState.RUNNING, "up-1"), now=NOW)
    assert again.task is None and again.events == () and again.verdict is Verdict.ACCEPTED


def test_report_warnings_are_added_to_the_task_once() -> None:
    warning = "provider_signature_not_checked: no secret"
    running = apply_report(task(), Report(TaskState.RUNNING, "up-1", warnings=(warning,)), now=NOW).task
    assert running is not None and running.warnings == (warning,)
    again = apply_report(running, Report(TaskState.RUNNING, "up-1").with_warning(warning), now=NOW)
    assert again.task is None  # nothing new: the warning is not repeated
    done = apply_report(running, Report(TaskState.SUCCEEDED, "up-1", images=(IMAGE,), warnings=(warning,)), now=NOW)
    assert done.task is not None and done.task.warnings == (warning,)
    late = apply_report(done.task, Report(TaskState.RUNNING, "up-1", warnings=("other",)), now=NOW)
    assert late.task is None and late.verdict is Verdict.IGNORED  # terminal tasks never change


def test_duplicates_change_nothing() -> None:
    t = apply_report(task(), Report(TaskState.SUCCEEDED, "up-1", images=(IMAGE,)), now=NOW, duplicate=True)
    assert t.task is None and t.verdict is Verdict.DUPLICATE


@pytest.mark.parametrize(
    ("report", "reason"),
    [
        pytest.param(Report(TaskState.RUNNING, "up-1"), "late", id="late-progress"),
        pytest.param(Report(TaskState.SUCCEEDED, "up-1", images=(IMAGE,)), "repeat", id="same-result-again"),
        pytest.param(Report(TaskState.FAILED, "up-1", error={"code": "x", "message": "y"}), "conflict",
                     id="disagreeing-terminal"),
        pytest.param(Report(TaskState.SUCCEEDED, "up-1", images=({"url": "https://other"},)), "conflict",
                     id="other-images"),
    ],
)
def test_after_a_terminal_state_callbacks_are_ignored(report: Report, reason: str) -> None:
    done = apply_report(task(), Report(TaskState.SUCCEEDED, "up-1", images=(IMAGE,)), now=NOW).task
    assert done is not None
    t = apply_report(done, report, now=NOW + 1)
    assert (t.task, t.verdict, t.reason) == (None, Verdict.IGNORED, reason)


def test_cancelled_tasks_ignore_late_results() -> None:
    cancelled = cancel(task(), now=NOW).task
    assert cancelled is not None
    t = apply_report(cancelled, Report(TaskState.SUCCEEDED, "up-1", images=(IMAGE,)), now=NOW)
    assert t.verdict is Verdict.IGNORED and t.task is None


def test_a_report_for_another_upstream_task_is_a_mismatch() -> None:
    with pytest.raises(TaskMismatch) as caught:
        apply_report(task(), Report(TaskState.SUCCEEDED, "up-2", images=(IMAGE,)), now=NOW)
    assert caught.value.status_code == 409 and caught.value.code == "task_mismatch"


def test_the_first_report_binds_the_upstream_id() -> None:
    early = task(TaskState.QUEUED, upstream_task_id=None, sequence=1)
    t = apply_report(early, Report(TaskState.SUCCEEDED, "up-9", images=(IMAGE,)), now=NOW)
    assert t.task is not None and t.task.upstream_task_id == "up-9" and t.task.state is TaskState.SUCCEEDED


def test_submission_recorded_after_an_early_callback_keeps_the_result() -> None:
    early = task(TaskState.QUEUED, upstream_task_id=None, sequence=1)
    done = apply_report(early, Report(TaskState.SUCCEEDED, None, images=(IMAGE,)), now=NOW).task
    assert done is not None and done.upstream_task_id is None
    t = record_submission(done, "up-9", now=NOW + 1)
    assert t.task is not None
    assert (t.task.state, t.task.upstream_task_id, t.task.sequence, t.events) == (
        TaskState.SUCCEEDED, "up-9", done.sequence, ()
    )


def test_submission_moves_a_queued_task_on() -> None:
    t = record_submission(task(TaskState.QUEUED, upstream_task_id=None, sequence=1), "up-1", now=NOW)
    assert t.task is not None and t.task.state is TaskState.SUBMITTED and t.task.sequence == 2
    assert t.events == (EventType.SUBMITTED,)


def test_refusal_fails_the_task_but_not_a_finished_one() -> None:
    error = {"code": "upstream_billing", "message": "402"}
    t = record_refusal(task(TaskState.QUEUED, sequence=1), error, now=NOW)
    assert t.task is not None and t.task.state is TaskState.FAILED and t.task.error == error
    done = task(TaskState.SUCCEEDED)
    assert record_refusal(done, error, now=NOW).task is None


def test_cancel_refuses_terminal_tasks() -> None:
    with pytest.raises(Conflict) as caught:
        cancel(task(TaskState.FAILED), now=NOW)
    assert caught.value.code == "task_terminal"


def test_expiry_only_when_due() -> None:
    assert expire(task(), now=NOW + 10).task is None
    t = expire(task(), now=NOW + 3600)
    assert t.task is not None and t.task.state is TaskState.EXPIRED and t.events == (EventType.EXPIRED,)
    assert expire(task(TaskState.SUCCEEDED), now=NOW + 7200).task is None


def test_api_shape() -> None:
    shown = task().to_api()
    assert shown["state"] == "submitted" and shown["created_at"].endswith("Z")
    assert set(shown) >= {"id", "provider", "model", "state", "upstream_task_id", "request", "result", "error",
                          "metadata", "sequence", "created_at", "updated_at", "completed_at"}


def test_submission_schedules_its_jobs_unless_the_task_is_over() -> None:
    poll = JobSpec("poll", NOW + 2, {"poll_url": "/v1/tasks/x"})
    queued = record_submission(task(TaskState.QUEUED, upstream_task_id=None, sequence=1), "up-1", now=NOW, jobs=[poll])
    assert queued.jobs == (poll,) and queued.task is not None and queued.task.state is TaskState.SUBMITTED
    running = record_submission(task(TaskState.RUNNING), "up-1", now=NOW, jobs=[poll])
    assert running.jobs == (poll,) and running.task is not None  # written, so the jobs are scheduled
    cancelled = record_submission(task(TaskState.CANCELLED), "up-1", now=NOW, jobs=[poll])
    assert cancelled.jobs == () and cancelled.task is None


def test_a_task_refuses_reports_of_another_dialect() -> None:
    from receiver.errors import InvalidPayload

    report = Report(TaskState.SUCCEEDED, "up-1", images=(IMAGE,), dialect="kling")
    with pytest.raises(InvalidPayload) as caught:
        apply_report(task(), report, now=NOW)
    assert caught.value.details == {"task_id": "tsk_1", "provider": "xhuoapi", "dialect": "kling"}
    # An `auto` task takes any dialect, and adopts it.
    adopted = apply_report(task(provider="auto"), report, now=NOW).task
    assert adopted is not None and adopted.provider == "kling"


@dataclass(frozen=True, slots=True)
class Nothing(Value):
    pass


@dataclass(frozen=True, slots=True)
class One(Value):
    a: TaskState


@dataclass(frozen=True, slots=True)
class Two(Value):
    a: TaskState
    b: Verdict


def test_values_replace_and_pickle_cheaply() -> None:
    import pickle

    original = task()
    assert pickle.loads(pickle.dumps(original)) == original
    changed = original.replace(sequence=9, warnings=("w",))
    assert (changed.sequence, changed.warnings, changed.id) == (9, ("w",), original.id)
    with pytest.raises(TypeError):
        original.replace(colour="red")
    for value in (Nothing(), One(TaskState.SUCCEEDED), Two(TaskState.FAILED, Verdict.IGNORED)):
        assert pickle.loads(pickle.dumps(value)) == value  # any number of fields; enums by name


# --- mirroring: the success is stored at once, announced when the images are kept ---------------


def test_a_success_to_mirror_is_stored_without_its_event_and_with_a_mirror_job() -> None:
    report = Report(TaskState.SUCCEEDED, "up-1", images=(IMAGE,), mirror=True)
    held = apply_report(task(), report, now=NOW)
    assert held.task is not None and held.task.state is TaskState.SUCCEEDED and held.task.sequence == 3
    assert held.events == () and held.jobs == (JobSpec(MIRROR, NOW),)
    assert held.task.result == {"images": [{"revised_prompt": None, "asset_url": None, **IMAGE}], "mirror": "pending"}
    assert held.task.mirroring


@pytest.mark.parametrize(
    "report",
    [
        pytest.param(Report(TaskState.SUCCEEDED, "up-1", images=(IMAGE,)), id="mirroring-off"),
        pytest.param(
            Report(TaskState.SUCCEEDED, "up-1", images=({"url": "u", "asset_url": "mine"},), mirror=True),
            id="already-kept",
        ),
        pytest.param(Report(TaskState.FAILED, "up-1", error={"code": "x"}, mirror=True), id="a-failure"),
    ],
)
def test_nothing_to_mirror_announces_at_once(report: Report) -> None:
    moved = apply_report(task(), report, now=NOW)
    assert moved.events == (EventType.for_state(report.state),) and moved.jobs == ()
    assert moved.task is not None and not moved.task.mirroring


def test_keeping_the_images_announces_the_success_once() -> None:
    held = apply_report(task(), Report(TaskState.SUCCEEDED, "up-1", images=(IMAGE, IMAGE), mirror=True), now=NOW)
    assert held.task is not None
    kept = {**IMAGE, "asset_url": "https://r.example/assets/t"}
    lost = {**IMAGE, "asset_url": None, "asset_error": {"code": "not_an_image", "message": "text/html"}}
    done = keep_images(held.task, (kept, lost), now=NOW + 2)
    assert done.events == (EventType.SUCCEEDED,) and done.task is not None
    assert done.task.sequence == held.task.sequence  # not a state change: the same sequence
    assert done.task.result == {"images": [kept, lost], "mirror": "failed"}
    assert done.task.warnings == ("image 1 was not kept (not_an_image): text/html",)
    assert not done.task.mirroring and done.task.updated_at == NOW + 2
    again = keep_images(done.task, (kept, kept), now=NOW + 3)
    assert again.task is None and again.events == () and again.verdict is Verdict.IGNORED
    assert keep_images(held.task, (kept, kept), now=NOW).task.result["mirror"] == "done"  # type: ignore[union-attr]


def test_late_callbacks_while_mirroring_are_ignored() -> None:
    held = apply_report(task(), Report(TaskState.SUCCEEDED, "up-1", images=(IMAGE,), mirror=True), now=NOW)
    assert held.task is not None
    late = apply_report(held.task, Report(TaskState.SUCCEEDED, "up-1", images=(IMAGE,), mirror=True), now=NOW)
    assert (late.task, late.verdict, late.reason) == (None, Verdict.IGNORED, "repeat")
