"""The store contract: written once, run against every backend (the `store` fixture)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from pathlib import Path

import asyncpg
import pytest

from receiver.broadcast import Notice
from receiver.errors import NotFound, StoreError, TaskMismatch
from receiver.ids import new_id
from receiver.store import create_store, migrations
from receiver.store.base import (
    Attempt,
    AttemptOutcome,
    DeliveryQuery,
    IdempotencyKey,
    IncomingCallback,
    Store,
    StoredCallback,
    Subscription,
    TaskQuery,
)
from receiver.store.postgres import ConnectTarget, PostgresStore, _shifted, parse_url
from receiver.store.sqlite import SQLiteStore
from receiver.tasks import (
    MIRROR,
    JobSpec,
    Report,
    Task,
    Transition,
    apply_report,
    cancel,
    keep_images,
    record_submission,
)
from receiver.types import DeliveryStatus, EventType, TaskState, Verdict
from tests.conftest import POSTGRES_URL, needs_postgres, postgres_database

pytestmark = pytest.mark.anyio

IMAGE = {"url": "https://cdn.example/a.png"}


@asynccontextmanager
async def opened(store: Store) -> AsyncIterator[Store]:
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@asynccontextmanager
async def _sqlite(tmp_path: Path) -> AsyncIterator[Store]:
    async with opened(SQLiteStore(tmp_path / "contract.db")) as store:
        yield store


@asynccontextmanager
async def _postgres(tmp_path: Path) -> AsyncIterator[Store]:
    async with postgres_database() as url, opened(PostgresStore(url)) as store:  # a fresh schema per test
        yield store


BACKENDS: dict[str, Callable[[Path], AbstractAsyncContextManager[Store]]] = {"sqlite": _sqlite, "postgres": _postgres}
_MARKS = {"postgres": [needs_postgres]}


@pytest.fixture(params=[pytest.param(name, marks=_MARKS.get(name, [])) for name in sorted(BACKENDS)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with BACKENDS[request.param](tmp_path) as backend:
        yield backend


def make_task(**changes) -> Task:
    now = time.time()
    base = Task(
        id=new_id("tsk"),
        provider="xhuoapi",
        model="gpt-image-2",
        state=TaskState.QUEUED,
        request={"prompt": "p"},
        metadata={"order": 7},
        created_at=now,
        updated_at=now,
        expires_at=now + 3600,
    )
    return base.replace(**changes)


def callback(task: Task, body: bytes = b'{"success": true}') -> IncomingCallback:
    return IncomingCallback(
        id=new_id("cb"),
        task_id=task.id,
        received_at=time.time(),
        body=body,
        headers={"content-type": "application/json"},
        body_sha256=hashlib.sha256(body).hexdigest(),
    )


def subscription(events=("*",), **changes) -> Subscription:
    now = time.time()
    base = Subscription(
        id=new_id("sub"),
        url="http://127.0.0.1:9/hook",
        events=tuple(events),
        secret="whsec_c2VjcmV0",
        created_at=now,
        updated_at=now,
    )
    return base.replace(**changes) if changes else base


def succeed(task: Task, *, now: float, jobs: tuple[JobSpec, ...] = ()) -> Transition:
    """A decision (module-level, so it can travel to the SQLite writer): the task succeeded."""
    return apply_report(task, succeeded(task.upstream_task_id), now=now).with_jobs(*jobs)


def boom(task: Task) -> Transition:
    raise RuntimeError("decided badly")


def succeeded(upstream: str | None = "up-1") -> Report:
    return Report(TaskState.SUCCEEDED, upstream, images=(IMAGE,), dialect="xhuoapi")


async def submitted(store: Store, **changes) -> Task:
    task = make_task(**changes)
    await store.create_task(task)
    applied = await store.transition(
        task.id, partial(record_submission, upstream_task_id="up-" + task.id, now=time.time())
    )
    return applied.task


# --- tasks ------------------------------------------------------------------------


async def test_tasks_round_trip(store: Store) -> None:
    task = make_task(notify_url="http://127.0.0.1:9/n", warnings=("dropped 'style'",))
    created = await store.create_task(task)
    assert created.created and created.task == task
    assert await store.get_task(task.id) == task
    assert await store.get_task("tsk_missing") is None


def test_a_tasks_row_holds_every_column_and_an_update_only_the_changed_ones_encoded_alike() -> None:
    from receiver.store.rows import TASK_COLUMNS, task_changes, task_params

    before = make_task()
    after = before.replace(
        state=TaskState.SUCCEEDED,
        result={"images": [{"url": "https://cdn.example/a.png"}]},
        sequence=before.sequence + 1,
        warnings=("w",),
        completed_at=5.0,
    )
    assert set(task_params(before)) == set(TASK_COLUMNS)
    changes = task_changes(before, after)
    assert set(changes) == {"state", "result", "sequence", "warnings", "completed_at"}
    assert changes == {column: task_params(after)[column] for column in changes}
    assert changes["state"] == "succeeded" and changes["warnings"] == '["w"]'
    assert task_changes(after, after.replace(request=dict(after.request))) == {}  # equal, not the same object
    assert "id" not in task_changes(before, after.replace(id="tsk_other"))  # the row is found by its id


async def test_idempotency_keys(store: Store) -> None:
    first = make_task()
    key = IdempotencyKey("scope:key-1", "fp-a")
    assert (await store.create_task(first, idempotency=key)).created
    again = await store.create_task(make_task(), idempotency=key)
    assert (again.created, again.same_request, again.task.id) == (False, True, first.id)
    other = await store.create_task(make_task(), idempotency=IdempotencyKey("scope:key-1", "fp-b"))
    assert (other.created, other.same_request, other.task.id) == (False, False, first.id)
    assert len(await store.list_tasks(TaskQuery(limit=10))) == 1


async def test_concurrent_requests_with_one_idempotency_key_create_one_task(store: Store) -> None:
    key = IdempotencyKey("scope:burst", "fp")
    results = await asyncio.gather(*(store.create_task(make_task(), idempotency=key) for _ in range(8)))
    created = [r for r in results if r.created]
    assert len(created) == 1
    assert {r.task.id for r in results} == {created[0].task.id} and all(r.same_request for r in results)
    assert [t.id for t in await store.list_tasks(TaskQuery(limit=10))] == [created[0].task.id]


async def test_transitions_are_written_with_their_events(store: Store) -> None:
    sub = await store.create_subscription(subscription(events=("task.succeeded",)))
    everything = await store.create_subscription(subscription())
    task = await submitted(store)
    applied = await store.transition(task.id, partial(succeed, now=time.time()))
    assert applied.task.state is TaskState.SUCCEEDED and applied.task.sequence == 3
    assert applied.deliveries == 2
    deliveries = await store.list_deliveries(DeliveryQuery(task_id=task.id))
    by_sub = {(d.subscription_id, d.event_type) for d in deliveries}
    assert by_sub == {
        (everything.id, "task.submitted"),
        (everything.id, "task.succeeded"),
        (sub.id, "task.succeeded"),
    }
    assert all(d.status is DeliveryStatus.PENDING for d in deliveries)


async def test_a_failed_decision_writes_nothing(store: Store) -> None:
    task = await submitted(store)

    with pytest.raises(RuntimeError):
        await store.transition(task.id, boom)
    assert await store.get_task(task.id) == task
    with pytest.raises(NotFound):
        await store.transition("tsk_missing", partial(cancel, now=time.time()))


async def test_callbacks_are_logged_with_their_verdict(store: Store) -> None:
    task = await submitted(store)
    body = b'{"success": true, "task_id": "x"}'
    first = await store.record_callback(callback(task, body), succeeded(task.upstream_task_id))
    assert first.verdict is Verdict.ACCEPTED and first.task.state is TaskState.SUCCEEDED
    again = await store.record_callback(callback(task, body), succeeded(task.upstream_task_id))
    assert again.verdict is Verdict.DUPLICATE and again.task == first.task
    late = await store.record_callback(
        callback(task, b'{"other": 1}'), Report(TaskState.RUNNING, task.upstream_task_id)
    )
    assert late.verdict is Verdict.IGNORED and late.transition.reason == "late"
    logged = await store.list_callbacks(task.id)
    assert [c.verdict for c in logged] == [Verdict.ACCEPTED, Verdict.DUPLICATE, Verdict.IGNORED]
    assert logged[0].body == body and logged[0].headers == {"content-type": "application/json"}
    assert logged[0].dialect == "xhuoapi" and logged[0].reported_state == "succeeded"


async def test_callbacks_keep_whether_their_provider_signature_was_checked(store: Store) -> None:
    task = await submitted(store)
    checked = dataclasses.replace(callback(task, b'{"a": 1}'), provider_signature="verified")
    unchecked = dataclasses.replace(callback(task, b'{"a": 2}'), provider_signature="unchecked")
    for incoming in (checked, unchecked, callback(task, b'{"a": 3}')):
        await store.record_callback(incoming, Report(TaskState.RUNNING, task.upstream_task_id))
    logged = await store.list_callbacks(task.id)
    assert [c.provider_signature for c in logged] == ["verified", "unchecked", None]
    assert logged[1].to_api()["provider_signature"] == "unchecked"


def test_a_stored_callback_shows_its_raw_body_as_base64_when_it_is_not_utf8() -> None:
    stored = StoredCallback(id="cb_1", task_id="tsk_1", received_at=0.0, body=b"\xff\xfe{}", headers={},
                            verdict=Verdict.ACCEPTED, reason=None, dialect=None, reported_state=None)
    shown = stored.to_api()
    assert (shown["raw_body"], shown["raw_body_encoding"]) == ("//57fQ==", "base64")
    assert shown["body"] == "\ufffd\ufffd{}"  # for reading only


async def test_a_mismatched_callback_stores_nothing(store: Store) -> None:
    task = await submitted(store)
    with pytest.raises(TaskMismatch):
        await store.record_callback(callback(task), succeeded("someone-else"))
    assert await store.list_callbacks(task.id) == []
    assert await store.get_task(task.id) == task
    with pytest.raises(NotFound):
        await store.record_callback(callback(make_task()), succeeded())


async def test_an_upstream_id_belongs_to_one_task(store: Store) -> None:
    first = await submitted(store)
    second = make_task()
    await store.create_task(second)
    with pytest.raises(TaskMismatch) as caught:
        await store.record_callback(callback(second), succeeded(first.upstream_task_id))
    assert (await store.get_task(second.id)) == second
    assert caught.value.details == {
        "task_id": second.id, "upstream_task_id": None, "payload_task_id": first.upstream_task_id,
        "reason": "upstream_task_taken"}
    assert f" {first.id}" not in caught.value.message and "already" in caught.value.message


async def test_listing_filters_and_pages(store: Store) -> None:
    tasks = []
    for i in range(5):
        tasks.append(make_task(provider="xhuoapi" if i % 2 else "other"))
        await store.create_task(tasks[-1])
        await asyncio.sleep(0.002)  # ids are time-ordered to the millisecond
    newest_first = [t.id for t in reversed(tasks)]
    page = await store.list_tasks(TaskQuery(limit=2))
    assert [t.id for t in page] == newest_first[:2]
    page2 = await store.list_tasks(TaskQuery(limit=2, before_id=page[-1].id))
    assert [t.id for t in page2] == newest_first[2:4]
    only = await store.list_tasks(TaskQuery(provider="other", limit=10))
    assert {t.id for t in only} == {tasks[0].id, tasks[2].id, tasks[4].id}
    done = await submitted(store)
    await store.transition(done.id, partial(cancel, now=time.time()))
    assert [t.id for t in await store.list_tasks(TaskQuery(state=TaskState.CANCELLED))] == [done.id]
    assert [t.id for t in await store.list_tasks(TaskQuery(upstream_task_id=done.upstream_task_id))] == [done.id]



async def test_lookups_by_text_no_row_can_hold_find_nothing(store: Store) -> None:
    """PostgreSQL text cannot hold a NUL: such lookups answered 503 store_unavailable there (bad input
    from a URL or query string, not an outage); on every backend they find nothing."""
    task = await submitted(store)
    odd = task.id + "\x00"
    assert await store.get_task(odd) is None
    assert await store.list_tasks(TaskQuery(upstream_task_id=odd)) == []
    assert await store.list_callbacks(odd) == []
    assert await store.get_subscription("sub_\x00") is None
    assert await store.get_delivery("dlv_\x00") is None
    assert await store.list_deliveries(DeliveryQuery(task_id=odd)) == []
    assert await store.get_task(task.id) == task


async def test_tasks_due_for_expiry(store: Store) -> None:
    now = time.time()
    late = make_task(expires_at=now - 1)
    fresh = make_task(expires_at=now + 100)
    finished = make_task(expires_at=now - 1, state=TaskState.SUCCEEDED)
    for task in (late, fresh, finished):
        await store.create_task(task)
    assert await store.tasks_due_for_expiry(now, 10) == [late.id]


async def test_expiry_sweeps_expire_due_tasks_once(store: Store) -> None:
    await store.create_subscription(subscription(events=("task.expired",)))
    now = time.time()
    late = [make_task(expires_at=now - 3 + i) for i in range(3)]
    for task in [*late, make_task(expires_at=now + 100), make_task(expires_at=now - 1, state=TaskState.FAILED)]:
        await store.create_task(task)
    with store.feed.listen(late[0].id) as changes:
        first = await store.expire_tasks(now, 2)
        assert (await asyncio.wait_for(changes.get(), 1)).state is TaskState.EXPIRED
    assert [a.task.id for a in first] == [late[0].id, late[1].id]  # oldest deadline first
    assert all(a.task.state is TaskState.EXPIRED and a.deliveries == 1 for a in first)
    assert first[0].task.error == {"code": "task_timeout", "message": "No result arrived before the task's deadline."}
    assert [a.task.id for a in await store.expire_tasks(now, 2)] == [late[2].id]
    assert await store.expire_tasks(now, 2) == []
    assert await store.tasks_due_for_expiry(now, 10) == []
    assert len(await store.list_deliveries(DeliveryQuery(status=DeliveryStatus.PENDING))) == 3


async def test_changes_are_published_after_commit(store: Store) -> None:
    task = await submitted(store)
    with store.feed.listen(task.id) as changes:
        await store.transition(task.id, partial(cancel, now=time.time()))
        published = await asyncio.wait_for(changes.get(), 1)
    assert published.state is TaskState.CANCELLED
    assert (await store.get_task(task.id)) == published


async def test_concurrent_writes_all_land(store: Store) -> None:
    tasks = [await submitted(store) for _ in range(40)]
    results = await asyncio.gather(*(store.record_callback(callback(t), succeeded(t.upstream_task_id)) for t in tasks))
    assert all(r.task.state is TaskState.SUCCEEDED for r in results)
    counts = await store.counts()
    assert counts["tasks"]["succeeded"] == 40


async def test_a_read_sees_the_write_before_it_while_other_reads_run(store: Store) -> None:
    # Background workers read all the time (what is due next); a request that writes and then
    # reads must still see its own write.
    stop = asyncio.Event()

    async def poll() -> None:
        while not stop.is_set():
            await store.next_delivery_due()
            await store.next_job_due(["poll"])

    pollers = [asyncio.create_task(poll()) for _ in range(3)]
    try:
        for _ in range(150):
            sub = await store.create_subscription(subscription())
            assert await store.get_subscription(sub.id) is not None
            await store.update_subscription(sub.id, enabled=False)
            found = await store.get_subscription(sub.id)
            assert found is not None and not found.enabled
    finally:
        stop.set()
        await asyncio.gather(*pollers)


# --- subscriptions and deliveries -------------------------------------------------


async def test_subscriptions_crud(store: Store) -> None:
    sub = await store.create_subscription(subscription(description="mine"))
    assert await store.get_subscription(sub.id) == sub
    updated = await store.update_subscription(sub.id, enabled=False, events=("task.failed",))
    assert updated is not None and not updated.enabled and updated.events == ("task.failed",)
    assert [s.id for s in await store.list_subscriptions()] == [sub.id]
    assert await store.delete_subscription(sub.id)
    assert await store.get_subscription(sub.id) is None
    assert not await store.delete_subscription(sub.id)
    assert await store.update_subscription(sub.id, enabled=True) is None


async def test_notify_subscriptions_are_task_scoped(store: Store) -> None:
    task = make_task(notify_url="http://127.0.0.1:9/n")
    scoped = subscription(task_id=task.id, uses_notify_secret=True, secret="")
    await store.create_task(task, notify_subscription=scoped)
    other = make_task()
    await store.create_task(other)
    await store.transition(other.id, partial(cancel, now=time.time()))
    await store.transition(task.id, partial(cancel, now=time.time()))
    deliveries = await store.list_deliveries(DeliveryQuery(subscription_id=scoped.id))
    assert [d.task_id for d in deliveries] == [task.id]
    assert await store.list_subscriptions() == []
    assert [s.id for s in await store.list_subscriptions(include_task_scoped=True)] == [scoped.id]


async def test_deliveries_go_in_sequence_per_task(store: Store) -> None:
    sub = await store.create_subscription(subscription())
    a = await submitted(store)  # task.submitted pending for `a`
    await store.transition(a.id, partial(apply_report, report=Report(TaskState.RUNNING), now=time.time()))
    b = await submitted(store)
    now = time.time() + 1
    claimed = await store.claim_deliveries(now=now, limit=10, owner="w1", lease_seconds=30)
    # a's "running" waits behind a's "submitted"; b's own first event goes.
    assert sorted((j.delivery.task_id, j.delivery.event_type) for j in claimed) == sorted(
        [(a.id, "task.submitted"), (b.id, "task.submitted")]
    )
    assert all(j.subscription.id == sub.id and j.body.startswith(b'{"type":"task.submitted"') for j in claimed)
    assert await store.claim_deliveries(now=now, limit=10, owner="w2", lease_seconds=30) == []  # leased

    first = next(j for j in claimed if j.delivery.task_id == a.id)
    attempt = Attempt(at=now, status_code=200, latency_ms=3.0)
    await store.finish_attempt(first.delivery.id, "w1", AttemptOutcome(attempt, DeliveryStatus.SUCCEEDED))
    after = await store.claim_deliveries(now=now, limit=10, owner="w1", lease_seconds=30)
    assert [(j.delivery.task_id, j.delivery.event_type) for j in after] == [(a.id, "task.running")]


async def test_leases_expire(store: Store) -> None:
    await store.create_subscription(subscription())
    await submitted(store)
    now = time.time() + 1
    assert len(await store.claim_deliveries(now=now, limit=10, owner="dead", lease_seconds=5)) == 1
    assert await store.claim_deliveries(now=now + 4, limit=10, owner="w2", lease_seconds=5) == []
    assert len(await store.claim_deliveries(now=now + 6, limit=10, owner="w2", lease_seconds=5)) == 1


async def test_released_leases_are_claimable_at_once(store: Store) -> None:
    await store.create_subscription(subscription())
    await submitted(store)
    now = time.time() + 1
    assert len(await store.claim_deliveries(now=now, limit=10, owner="w1", lease_seconds=60)) == 1
    assert await store.release_leases("w1") == 1
    assert len(await store.claim_deliveries(now=now, limit=10, owner="w2", lease_seconds=60)) == 1


async def test_claims_take_at_most_so_many_per_subscription(store: Store) -> None:
    busy = await store.create_subscription(subscription())
    quiet = await store.create_subscription(subscription(events=("task.submitted",)))
    for _ in range(6):
        await submitted(store)  # each: a task.submitted event for both subscriptions
    now = time.time() + 1
    claimed = await store.claim_deliveries(now=now, limit=10, owner="w", lease_seconds=60, per_subscription=2)
    per_sub: dict[str, int] = {}
    for job in claimed:
        per_sub[job.subscription.id] = per_sub.get(job.subscription.id, 0) + 1
    assert per_sub == {busy.id: 2, quiet.id: 2}
    more = await store.claim_deliveries(now=now, limit=100, owner="w", lease_seconds=60)
    assert len(more) == 8  # the rest, now that no cap applies


async def test_deliveries_first_in_line_are_leased_at_creation_when_offered(store: Store) -> None:
    sub = await store.create_subscription(subscription())
    offered: list = []
    store.feed.take_offers("me", 30.0, offered.extend)
    try:
        task = await submitted(store)  # task.submitted: first in line, leased to "me" and offered
        assert [job.delivery.event_type for job in offered] == ["task.submitted"]
        job = offered[0]
        assert job.subscription.id == sub.id and job.subscription.url == sub.url
        assert job.body.startswith(b'{"type":"task.submitted"')
        # Leased: no claim gets it while the lease holds.
        assert await store.claim_deliveries(now=time.time() + 1, limit=10, owner="other", lease_seconds=30) == []
        # A later event of the same task waits behind the pending one: written, not offered.
        applied = await store.transition(
            task.id, partial(apply_report, report=Report(TaskState.RUNNING), now=time.time())
        )
        assert applied.deliveries == 1 and applied.offered == () and len(offered) == 1
        await store.finish_attempt(
            job.delivery.id, "me", AttemptOutcome(Attempt(time.time(), 200, 1.0), DeliveryStatus.SUCCEEDED)
        )
        [running] = await store.claim_deliveries(now=time.time() + 1, limit=10, owner="other", lease_seconds=30)
        assert running.delivery.event_type == "task.running"
    finally:
        store.feed.stop_taking_offers()
    await submitted(store)
    assert len(offered) == 1  # nobody takes offers now: nothing is leased at creation
    assert len(await store.claim_deliveries(now=time.time() + 1, limit=10, owner="w", lease_seconds=30)) == 1


async def test_a_retried_delivery_first_in_line_is_leased_and_handed_over_to_go_now(store: Store) -> None:
    await store.create_subscription(subscription())
    task = await submitted(store)
    ok = AttemptOutcome(Attempt(time.time(), 200, 1.0), DeliveryStatus.SUCCEEDED)
    failed = AttemptOutcome(Attempt(time.time(), 500, 1.0, error="HTTP 500"), DeliveryStatus.FAILED)
    [first] = await store.claim_deliveries(now=time.time() + 1, limit=10, owner="w", lease_seconds=30)
    await store.finish_attempt(first.delivery.id, "w", ok)
    await store.transition(task.id, partial(apply_report, report=Report(TaskState.RUNNING), now=time.time()))
    [second] = await store.claim_deliveries(now=time.time() + 1, limit=10, owner="w", lease_seconds=30)
    await store.finish_attempt(second.delivery.id, "w", failed)
    resent: list = []
    store.feed.take_offers("me", 30.0, lambda jobs: None, resent.append)
    try:
        await store.retry_delivery(first.delivery.id, now=time.time())
        [job] = resent
        assert (job.delivery.id, job.delivery.status, job.delivery.attempt_count) == (
            first.delivery.id, DeliveryStatus.PENDING, 1)
        assert job.body == first.body and job.subscription.id == first.subscription.id
        # Retried too, the later event waits behind the earlier one: not leased, not handed over.
        await store.retry_delivery(second.delivery.id, now=time.time())
        assert len(resent) == 1
        # The first is leased to the dispatcher sending it now; the second waits: no claim takes either.
        assert await store.claim_deliveries(now=time.time() + 1, limit=10, owner="other", lease_seconds=30) == []
        await store.finish_attempt(job.delivery.id, "me", ok)
        [after] = await store.claim_deliveries(now=time.time() + 1, limit=10, owner="other", lease_seconds=30)
        assert after.delivery.id == second.delivery.id
    finally:
        store.feed.stop_taking_offers()


async def test_retries_racing_each_other_send_the_delivery_once(store: Store) -> None:
    """Two retries of one failed delivery (a double click; two instances): the first makes it pending
    and hands it to be sent; the second changes nothing, so one attempt goes out, not two at once."""
    await store.create_subscription(subscription())
    await submitted(store)
    [job] = await store.claim_deliveries(now=time.time() + 1, limit=10, owner="w", lease_seconds=30)
    failed = AttemptOutcome(Attempt(time.time(), 500, 1.0, error="HTTP 500"), DeliveryStatus.FAILED)
    await store.finish_attempt(job.delivery.id, "w", failed)
    resent: list = []
    store.feed.take_offers("me", 30.0, resent.extend, resent.append)
    try:
        first, second = await asyncio.gather(
            store.retry_delivery(job.delivery.id, now=time.time()),
            store.retry_delivery(job.delivery.id, now=time.time()),
        )
    finally:
        store.feed.stop_taking_offers()
    assert [r is not None for r in (first, second)].count(True) == 1
    assert len(resent) == 1
    assert await store.claim_deliveries(now=time.time() + 1, limit=10, owner="other", lease_seconds=30) == []


async def test_a_delivery_whose_subscription_was_deleted_is_not_retried(store: Store) -> None:
    """The retry route checks the subscription first; one deleted between that read and the retry
    must neither make the delivery pending (it could never go) nor hand it to a dispatcher."""
    sub = await store.create_subscription(subscription())
    await submitted(store)
    [job] = await store.claim_deliveries(now=time.time() + 1, limit=10, owner="w", lease_seconds=30)
    failed = AttemptOutcome(Attempt(time.time(), 500, 1.0, error="HTTP 500"), DeliveryStatus.FAILED)
    await store.finish_attempt(job.delivery.id, "w", failed)
    await store.delete_subscription(sub.id)
    resent: list = []
    store.feed.take_offers("me", 30.0, resent.extend, resent.append)
    try:
        assert await store.retry_delivery(job.delivery.id, now=time.time()) is None
    finally:
        store.feed.stop_taking_offers()
    assert resent == []
    kept = await store.get_delivery(job.delivery.id)
    assert kept is not None and kept.status is DeliveryStatus.FAILED


async def test_an_events_deliveries_are_offered_by_their_own_subscriptions_line(store: Store) -> None:
    await store.create_subscription(subscription())  # "early": subscribed before the task
    offered: list = []
    store.feed.take_offers("me", 30.0, offered.extend)
    try:
        task = await submitted(store)  # early's task.submitted: offered, still pending
        late = await store.create_subscription(subscription())
        offered.clear()
        applied = await store.transition(
            task.id, partial(apply_report, report=Report(TaskState.RUNNING), now=time.time())
        )
        # early's task.running waits behind its task.submitted; late has nothing pending: it goes.
        assert applied.deliveries == 2
        assert [(job.subscription.id, job.delivery.event_type) for job in offered] == [(late.id, "task.running")]
    finally:
        store.feed.stop_taking_offers()


async def test_claims_skip_excluded_subscriptions(store: Store) -> None:
    busy = await store.create_subscription(subscription())
    free = await store.create_subscription(subscription())
    await submitted(store)
    now = time.time() + 1
    claimed = await store.claim_deliveries(
        now=now, limit=10, owner="w", lease_seconds=30, exclude_subscriptions=[busy.id]
    )
    assert [j.subscription.id for j in claimed] == [free.id]
    assert await store.next_delivery_due(exclude_subscriptions=[busy.id, free.id]) is None
    assert await store.next_delivery_due(exclude_subscriptions=[free.id]) is not None
    [later] = await store.claim_deliveries(now=now, limit=10, owner="w", lease_seconds=30)
    assert later.subscription.id == busy.id


async def test_released_deliveries_go_back_unsent(store: Store) -> None:
    await store.create_subscription(subscription())
    await submitted(store)
    now = time.time() + 1
    [job] = await store.claim_deliveries(now=now, limit=10, owner="w1", lease_seconds=60)
    assert await store.release_deliveries([job.delivery.id], "someone-else") == 0
    assert await store.release_deliveries([job.delivery.id], "w1") == 1
    assert await store.release_deliveries([], "w1") == 0
    [again] = await store.claim_deliveries(now=now, limit=10, owner="w2", lease_seconds=60)
    assert again.delivery.id == job.delivery.id
    assert again.delivery.attempt_count == 0 and again.delivery.next_attempt_at == job.delivery.next_attempt_at
    delivery = await store.get_delivery(job.delivery.id)
    assert delivery is not None and delivery.attempts == ()


async def test_next_due_counts_the_first_in_line_and_leases(store: Store) -> None:
    await store.create_subscription(subscription())
    task = await submitted(store)
    await store.transition(task.id, partial(apply_report, report=Report(TaskState.RUNNING), now=time.time()))
    now = time.time() + 1
    [first] = await store.claim_deliveries(now=now, limit=10, owner="w", lease_seconds=30)
    # In flight: due when its lease ends, and the event behind it does not count.
    assert await store.next_delivery_due() == pytest.approx(now + 30)
    failed = Attempt(at=now, status_code=500, latency_ms=1)
    await store.finish_attempt(
        first.delivery.id, "w", AttemptOutcome(failed, DeliveryStatus.PENDING, next_attempt_at=now + 7)
    )
    assert await store.next_delivery_due() == pytest.approx(now + 7)
    [again] = await store.claim_deliveries(now=now + 7, limit=10, owner="w", lease_seconds=30)
    ok = Attempt(at=now + 7, status_code=200, latency_ms=1)
    await store.finish_attempt(again.delivery.id, "w", AttemptOutcome(ok, DeliveryStatus.SUCCEEDED))
    due = await store.next_delivery_due()
    assert due is not None and due <= now  # task.running, committed before, goes at once


async def test_attempts_retries_and_failure(store: Store) -> None:
    sub = await store.create_subscription(subscription())
    task = await submitted(store)
    now = time.time() + 1
    [job] = await store.claim_deliveries(now=now, limit=10, owner="w", lease_seconds=30)
    failed = Attempt(at=now, status_code=503, latency_ms=12.5, error="HTTP 503", response_body="busy")
    await store.finish_attempt(
        job.delivery.id, "w", AttemptOutcome(failed, DeliveryStatus.PENDING, next_attempt_at=now + 5)
    )
    assert await store.claim_deliveries(now=now + 1, limit=10, owner="w", lease_seconds=30) == []
    assert await store.next_delivery_due() == pytest.approx(now + 5)
    [job] = await store.claim_deliveries(now=now + 5, limit=10, owner="w", lease_seconds=30)
    assert job.delivery.attempt_count == 1
    last = Attempt(at=now + 5, status_code=None, latency_ms=10000, error="timeout")
    await store.finish_attempt(
        job.delivery.id, "w", AttemptOutcome(last, DeliveryStatus.FAILED, disable="endpoint failing for 5 days")
    )
    delivery = await store.get_delivery(job.delivery.id)
    assert delivery is not None and delivery.status is DeliveryStatus.FAILED and delivery.attempt_count == 2
    assert [a.status_code for a in delivery.attempts] == [503, None]
    assert delivery.attempts[0].response_body == "busy"
    disabled = await store.get_subscription(sub.id)
    assert disabled is not None and not disabled.enabled and disabled.failing_since == pytest.approx(now)
    assert disabled.disabled_reason == "endpoint failing for 5 days"
    failed_list = await store.list_deliveries(DeliveryQuery(status=DeliveryStatus.FAILED, task_id=task.id))
    assert [d.id for d in failed_list] == [delivery.id]

    await store.update_subscription(sub.id, enabled=True)
    retried = await store.retry_delivery(delivery.id, now=now + 10)
    assert retried is not None and retried.status is DeliveryStatus.PENDING
    assert await store.retry_delivery("dlv_missing", now=now) is None


async def test_recover_resends_failures_since(store: Store) -> None:
    sub = await store.create_subscription(subscription())
    for _ in range(3):
        await submitted(store)
    now = time.time() + 1
    jobs = await store.claim_deliveries(now=now, limit=10, owner="w", lease_seconds=30)
    for job in jobs:
        attempt = Attempt(at=now, status_code=500, latency_ms=1)
        await store.finish_attempt(job.delivery.id, "w", AttemptOutcome(attempt, DeliveryStatus.FAILED))
    assert await store.recover_deliveries(sub.id, since=0, now=now) == 3
    assert len(await store.claim_deliveries(now=now, limit=10, owner="w", lease_seconds=30)) == 3


async def test_deleting_a_subscription_closes_its_deliveries(store: Store) -> None:
    sub = await store.create_subscription(subscription())
    await submitted(store)
    await submitted(store)
    now = time.time() + 1
    [in_flight] = await store.claim_deliveries(now=now, limit=1, owner="w", lease_seconds=30)
    await store.delete_subscription(sub.id)
    assert await store.claim_deliveries(now=now, limit=10, owner="w", lease_seconds=30) == []
    assert await store.next_delivery_due() is None
    # An attempt that was in flight ends after the deletion: its delivery stays closed.
    retry = Attempt(at=now, status_code=500, latency_ms=1)
    await store.finish_attempt(
        in_flight.delivery.id, "w", AttemptOutcome(retry, DeliveryStatus.PENDING, next_attempt_at=now)
    )
    closed = await store.get_delivery(in_flight.delivery.id)
    assert closed is not None and closed.status is DeliveryStatus.FAILED and closed.attempt_count == 1
    assert (await store.counts())["pending_deliveries"] == 0


async def test_disabled_subscriptions_hold_their_deliveries(store: Store) -> None:
    sub = await store.create_subscription(subscription())
    await submitted(store)
    await store.update_subscription(sub.id, enabled=False)
    assert await store.claim_deliveries(now=time.time() + 1, limit=10, owner="w", lease_seconds=30) == []
    await store.update_subscription(sub.id, enabled=True)
    assert len(await store.claim_deliveries(now=time.time() + 1, limit=10, owner="w", lease_seconds=30)) == 1


async def test_events_outside_tasks_reach_one_subscription(store: Store) -> None:
    sub = await store.create_subscription(subscription(events=("task.failed",)))
    await store.create_subscription(subscription())
    assert await store.emit_event(EventType.PING, {"subscription_id": sub.id}, subscription_id=sub.id) == 1
    [job] = await store.claim_deliveries(now=time.time() + 1, limit=10, owner="w", lease_seconds=30)
    assert job.subscription.id == sub.id and job.delivery.event_type == "ping" and job.delivery.task_id is None


# --- jobs -------------------------------------------------------------------------


async def test_jobs_are_leased_rescheduled_and_finished(store: Store) -> None:
    task = make_task()
    now = time.time()
    await store.create_task(task, jobs=[JobSpec("poll", now, {"poll_url": "/v1/tasks/x"})])
    [job] = await store.claim_jobs(["poll"], now=now, limit=5, owner="w", lease_seconds=30)
    assert job.task_id == task.id and job.payload == {"poll_url": "/v1/tasks/x"} and job.attempts == 0
    assert await store.claim_jobs(["poll"], now=now, limit=5, owner="w2", lease_seconds=30) == []
    await store.finish_job(job.id, reschedule_at=now + 4, payload={"poll_url": "/v1/tasks/x", "delay": 4})
    assert await store.next_job_due(["poll"]) == pytest.approx(now + 4)
    assert await store.claim_jobs(["poll"], now=now + 1, limit=5, owner="w", lease_seconds=30) == []
    [again] = await store.claim_jobs(["poll"], now=now + 4, limit=5, owner="w", lease_seconds=30)
    assert again.attempts == 1 and again.payload["delay"] == 4
    await store.finish_job(again.id)
    assert await store.next_job_due(["poll"]) is None


async def test_terminal_tasks_drop_their_jobs(store: Store) -> None:
    task = make_task()
    await store.create_task(task)
    await store.schedule_job(task.id, "poll", run_at=time.time(), payload={})
    await store.transition(task.id, partial(cancel, now=time.time()))
    assert await store.claim_jobs(["poll"], now=time.time() + 1, limit=5, owner="w", lease_seconds=30) == []


async def test_transitions_schedule_jobs(store: Store) -> None:
    task = await submitted(store)
    now = time.time()
    await store.transition(
        task.id,
        partial(succeed, now=now, jobs=(JobSpec("mirror", now, {}),)),
    )
    [job] = await store.claim_jobs(["mirror"], now=now + 1, limit=5, owner="w", lease_seconds=30)
    assert job.task_id == task.id


async def test_watchers_hear_of_every_change_callback_and_delivery_attempt(store: Store) -> None:
    await store.create_subscription(subscription())
    task = await submitted(store)
    with store.feed.watch() as everything:
        logged, repeated = callback(task, b'{"progress": 1}'), callback(task, b'{"progress": 1}')
        await store.record_callback(logged, Report(TaskState.RUNNING, task.upstream_task_id))
        await store.record_callback(repeated, Report(TaskState.RUNNING, task.upstream_task_id))  # a duplicate
        [job] = await store.claim_deliveries(now=time.time() + 1, limit=10, owner="w", lease_seconds=30)
        attempt = Attempt(at=time.time(), status_code=500, latency_ms=3.0, error="HTTP 500")
        await store.finish_attempt(job.delivery.id, "w", AttemptOutcome(attempt, DeliveryStatus.FAILED))
        await store.retry_delivery(job.delivery.id, now=time.time())
        seen = [everything.get_nowait() for _ in range(everything.qsize())]
    assert [getattr(item, "state", None) for item in seen if isinstance(item, Task)] == [TaskState.RUNNING]
    assert [(n.kind, n.task_id, n.id) for n in seen if isinstance(n, Notice)] == [
        ("callback", task.id, logged.id),
        ("callback", task.id, repeated.id),
        ("delivery", task.id, job.delivery.id),
        ("delivery", task.id, job.delivery.id),
    ]
    assert store.feed.watcher_count() == 0


async def test_a_success_being_mirrored_is_announced_when_its_images_are_kept(store: Store) -> None:
    await store.create_subscription(subscription(events=("task.succeeded",)))
    task = await submitted(store)
    report = succeeded(task.upstream_task_id).replace(mirror=True)
    held = await store.record_callback(callback(task), report)
    assert held.task.state is TaskState.SUCCEEDED and held.task.mirroring and held.deliveries == 0
    [job] = await store.claim_jobs([MIRROR], now=time.time() + 1, limit=5, owner="w", lease_seconds=30)
    kept = ({**IMAGE, "asset_url": "https://r.example/assets/t"},)
    done = await store.transition(task.id, partial(keep_images, images=kept, now=time.time()))
    assert done.deliveries == 1 and not done.task.mirroring and done.task.sequence == held.task.sequence
    again = await store.transition(task.id, partial(keep_images, images=kept, now=time.time()))
    assert again.deliveries == 0 and not again.transition.changed
    [delivery] = await store.claim_deliveries(now=time.time() + 1, limit=5, owner="w", lease_seconds=30)
    assert delivery.delivery.event_type == "task.succeeded" and b"https://r.example/assets/t" in delivery.body
    await store.finish_job(job.id)


# --- backend specifics ------------------------------------------------------------


async def test_sqlite_commits_concurrent_writes_together(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "group.db")
    await store.open()
    try:
        tasks = [make_task() for _ in range(200)]
        before = store.writer_stats
        await asyncio.gather(*(store.create_task(t) for t in tasks))
        commits, operations = (a - b for a, b in zip(store.writer_stats, before, strict=True))
        assert operations == 200
        assert commits < operations / 4, f"{commits} commits for {operations} writes"
    finally:
        await store.close()


async def test_sqlite_keeps_everything_across_a_reopen(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "durable.db")
    await store.open()
    task = await submitted(store)
    await store.record_callback(callback(task), succeeded(task.upstream_task_id))
    await store.close()
    reopened = SQLiteStore(tmp_path / "durable.db")
    await reopened.open()
    try:
        again = await reopened.get_task(task.id)
        assert again is not None and again.state is TaskState.SUCCEEDED
        assert len(await reopened.list_callbacks(task.id)) == 1
        assert await reopened.check_ready() is None
        assert await reopened.migrate() == []  # nothing left to apply
    finally:
        await reopened.close()


async def test_a_new_sqlite_database_is_readable_by_its_owner_alone(tmp_path: Path) -> None:
    """It holds the subscriptions' signing secrets; the -wal and -shm files take its mode."""
    import stat

    store = SQLiteStore(tmp_path / "private.db")
    await store.open()
    try:
        await store.create_subscription(subscription())
        files = [tmp_path / name for name in ("private.db", "private.db-wal", "private.db-shm")]
        assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: 0o600 for f in files}
    finally:
        await store.close()


# --- PostgreSQL: several instances on one database ----------------------------------


@asynccontextmanager
async def instances(count: int = 2) -> AsyncIterator[list[PostgresStore]]:
    """`count` stores on one fresh schema, as separate receiver instances would be."""
    async with postgres_database() as url:
        stores = [PostgresStore(url) for _ in range(count)]
        await asyncio.gather(*(s.open() for s in stores))
        try:
            yield stores
        finally:
            for s in stores:
                await s.close()


async def eventually(condition: Callable[[], bool], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - polls another object's state
            await asyncio.sleep(0.02)


async def reaches(changes: asyncio.Queue[Task], state: TaskState, timeout: float = 5) -> Task:
    """The first published change in `state` (a feed may show earlier states first)."""
    async with asyncio.timeout(timeout):
        while (task := await changes.get()).state is not state:
            pass
    return task


@pytest.mark.parametrize(
    ("url", "dsn", "schema", "pool_size"),
    [
        pytest.param("postgresql://u@h/db", "postgresql://u@h/db", None, 10, id="plain"),
        pytest.param(
            "postgres://u:p%40w@h:5433/db?schema=s_1&pool_size=3",
            "postgres://u:p%40w@h:5433/db",
            "s_1",
            3,
            id="receiver-parameters-removed",
        ),
        pytest.param(
            "postgresql://h/db?sslmode=require&schema=x",
            "postgresql://h/db?sslmode=require",
            "x",
            10,
            id="others-kept-for-asyncpg",
        ),
    ],
)
async def test_postgres_urls(url: str, dsn: str, schema: str | None, pool_size: int) -> None:
    assert parse_url(url) == ConnectTarget(dsn, schema, pool_size)


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("postgresql://h/db?schema=Bad-Name", id="schema-not-a-plain-name"),
        pytest.param("postgresql://h/db?schema=x;drop", id="schema-injection"),
        pytest.param("postgresql://h/db?pool_size=0", id="pool-size-zero"),
        pytest.param("mysql://h/db", id="not-postgres"),
    ],
)
async def test_postgres_urls_refused(url: str) -> None:
    with pytest.raises(ValueError):
        PostgresStore(url)


async def test_postgres_urls_pick_the_postgres_store() -> None:
    store = create_store("postgres://u@h/db?schema=deploy_a")
    assert isinstance(store, PostgresStore) and store.schema == "deploy_a"


async def test_postgres_unreachable_fails_to_open() -> None:
    store = PostgresStore("postgresql://postgres@127.0.0.1:1/test")
    with pytest.raises(StoreError, match="cannot connect"):
        await store.open()


@needs_postgres
async def test_postgres_schema_from_the_search_path() -> None:
    async with postgres_database() as url:
        schema = parse_url(url).schema
        admin = await asyncpg.connect(POSTGRES_URL)
        try:
            await admin.execute(f"CREATE SCHEMA {schema}")  # libpq style: the schema must exist
            sep = "&" if "?" in POSTGRES_URL else "?"
            async with opened(PostgresStore(f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}")) as store:
                assert store.schema == schema and await store.check_ready() is None
                tables = await admin.fetchval(
                    "SELECT count(*) FROM information_schema.tables WHERE table_schema = $1", schema
                )
                assert tables == 9
        finally:
            await admin.close()


@needs_postgres
async def test_postgres_pooled_connections_come_back_without_a_reset_round_trip() -> None:
    """A connection given back to the pool is not reset (RESET ALL, UNLISTEN *, …: a round trip per
    request, with no session state of ours to undo); a transaction left open on it is still rolled back."""
    async with postgres_database() as url, opened(PostgresStore(url + "&pool_size=1")) as store:
        pool = store._pool
        assert pool is not None
        async with pool.acquire() as conn:
            server = conn.get_server_pid()
            await conn.execute("SET application_name = 'left-as-it-was'")
            await conn.execute("BEGIN")
            await conn.execute("DELETE FROM schema_migrations")
        async with pool.acquire() as conn:
            assert conn.get_server_pid() == server
            assert await conn.fetchval("SHOW application_name") == "left-as-it-was"  # no reset ran
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(migrations.load("postgres"))


@needs_postgres
async def test_postgres_a_callback_costs_six_round_trips() -> None:
    """Begin; lock the task; count its callbacks; read its subscribers; every write (the task, its
    jobs, the callback log, the notification) as one statement; commit. Each trip costs the request
    loop tens of microseconds, so this guards ingest on PostgreSQL against a statement creeping in."""
    async with postgres_database() as url, opened(PostgresStore(url + "&pool_size=1")) as store:
        task = await submitted(store)
        queries: list[str] = []
        assert store._pool is not None
        async with store._pool.acquire() as conn:  # the pool's only connection: it logs every query
            conn.add_query_logger(lambda record: queries.append(record.query))
        await store.record_callback(callback(task), succeeded(task.upstream_task_id))
        assert [query.split()[0].rstrip(";") for query in queries] == [
            "BEGIN",
            "SELECT",
            "SELECT",
            "SELECT",
            "WITH",
            "COMMIT",
        ]
        assert (await store.get_task(task.id)).state is TaskState.SUCCEEDED  # type: ignore[union-attr]
        assert len(await store.list_callbacks(task.id)) == 1


def test_postgres_batched_writes_renumber_their_placeholders() -> None:
    assert _shifted("UPDATE t SET a = $2 WHERE id = $1 AND b = ANY($12::text[])", 3) == (
        "UPDATE t SET a = $5 WHERE id = $4 AND b = ANY($15::text[])"
    )
    assert _shifted("SELECT $1", 0) == "SELECT $1"


@needs_postgres
async def test_postgres_instances_starting_together_migrate_once(logs) -> None:
    async with instances(3) as stores:
        versions = [m.version for m in migrations.load("postgres")]
        assert [e["version"] for e in logs.events("store.migrated")] == versions
        for s in stores:
            assert await s.check_ready() is None
            assert await s.migrate() == []


@needs_postgres
async def test_postgres_instances_never_claim_the_same_work() -> None:
    async with instances() as (a, b):
        await a.create_subscription(subscription())
        now = time.time()
        for _ in range(30):
            await a.create_task(make_task(), jobs=[JobSpec("poll", now, {})], events=[EventType.SUBMITTED])

        async def deliveries(store: Store, owner: str) -> list[str]:
            claimed: list[str] = []
            while batch := await store.claim_deliveries(now=now + 1, limit=3, owner=owner, lease_seconds=60):
                claimed += [job.delivery.id for job in batch]
            return claimed

        async def jobs(store: Store, owner: str) -> list[str]:
            claimed: list[str] = []
            while batch := await store.claim_jobs(["poll"], now=now + 1, limit=3, owner=owner, lease_seconds=60):
                claimed += [job.id for job in batch]
            return claimed

        for drain in (deliveries, jobs):
            shares = await asyncio.gather(drain(a, "a1"), drain(b, "b1"), drain(a, "a2"), drain(b, "b2"))
            everything = [item for share in shares for item in share]
            assert len(everything) == len(set(everything)) == 30, [len(s) for s in shares]


@needs_postgres
async def test_postgres_instances_keep_each_tasks_events_in_order() -> None:
    async with instances() as (a, b):
        await a.create_subscription(subscription())
        task = await submitted(a)
        await a.transition(task.id, partial(apply_report, report=Report(TaskState.RUNNING), now=time.time()))
        now = time.time() + 1
        [first] = await a.claim_deliveries(now=now, limit=10, owner="a", lease_seconds=30)
        assert first.delivery.event_type == "task.submitted"
        assert await b.claim_deliveries(now=now, limit=10, owner="b", lease_seconds=30) == []  # waits behind it
        ok = AttemptOutcome(Attempt(at=now, status_code=200, latency_ms=1), DeliveryStatus.SUCCEEDED)
        await a.finish_attempt(first.delivery.id, "a", ok)
        [second] = await b.claim_deliveries(now=now, limit=10, owner="b", lease_seconds=30)
        assert second.delivery.event_type == "task.running"


@needs_postgres
async def test_postgres_a_dead_instances_leases_are_taken_over() -> None:
    async with instances(2) as (dead, survivor):
        await dead.create_subscription(subscription())
        await dead.create_task(make_task(), jobs=[JobSpec("poll", time.time(), {})], events=[EventType.SUBMITTED])
        now = time.time() + 1
        [held] = await dead.claim_deliveries(now=now, limit=5, owner="dead", lease_seconds=30)
        [job] = await dead.claim_jobs(["poll"], now=now, limit=5, owner="dead", lease_seconds=30)
        await dead.close()  # gone without handing its leases back, as after a SIGKILL

        assert await survivor.claim_deliveries(now=now + 29, limit=5, owner="survivor", lease_seconds=30) == []
        assert await survivor.claim_jobs(["poll"], now=now + 29, limit=5, owner="survivor", lease_seconds=30) == []
        [taken] = await survivor.claim_deliveries(now=now + 31, limit=5, owner="survivor", lease_seconds=30)
        [retaken] = await survivor.claim_jobs(["poll"], now=now + 31, limit=5, owner="survivor", lease_seconds=30)
        # The same delivery of the same event, byte for byte: a resend keeps its webhook-id.
        assert (taken.delivery.id, taken.delivery.event_id, taken.body) == (
            held.delivery.id,
            held.delivery.event_id,
            held.body,
        )
        assert retaken.id == job.id
        ok = AttemptOutcome(Attempt(at=now + 31, status_code=200, latency_ms=1), DeliveryStatus.SUCCEEDED)
        await survivor.finish_attempt(taken.delivery.id, "survivor", ok)
        done = await survivor.get_delivery(taken.delivery.id)
        assert done is not None and done.status is DeliveryStatus.SUCCEEDED


@needs_postgres
async def test_postgres_expiry_sweeps_on_two_instances_split_the_work() -> None:
    async with instances() as (a, b):
        now = time.time()
        tasks = [make_task(expires_at=now - 1) for _ in range(40)]
        for task in tasks:
            await a.create_task(task)
        sweeps = await asyncio.gather(*(store.expire_tasks(now, 7) for store in (a, b) * 4))
        swept = [applied.task.id for sweep in sweeps for applied in sweep]
        while rest := await a.expire_tasks(now, 50):
            swept += [applied.task.id for applied in rest]
        assert sorted(swept) == sorted(task.id for task in tasks)  # each expired once, by one instance
        assert {(await a.get_task(task.id)).sequence for task in tasks} == {2}


@needs_postgres
async def test_postgres_a_commit_on_one_instance_reaches_the_others() -> None:
    async with instances() as (a, b):
        await a.create_subscription(subscription())
        task = await submitted(a)
        with a.feed.listen(task.id) as on_a, b.feed.listen(task.id) as on_b:
            await a.transition(task.id, partial(cancel, now=time.time()))
            seen = await reaches(on_b, TaskState.CANCELLED)
            assert seen.sequence == 3
            assert seen == await b.get_task(task.id)
            assert await b.feed.wait("deliveries", 5)  # a's new delivery wakes b's dispatcher
            await a.schedule_job(task.id, "poll", run_at=time.time(), payload={})
            assert await b.feed.wait("jobs", 5)
            assert (await on_a.get()).state is TaskState.CANCELLED
            await asyncio.sleep(0.2)
            assert on_a.empty()  # a's own notification is not published a second time


@needs_postgres
async def test_postgres_the_listener_survives_a_terminated_connection(logs, monkeypatch) -> None:
    async with instances() as (a, b):
        listener = b._listener
        assert listener is not None and listener.pid is not None
        pid = listener.pid
        reconnect, connect = asyncio.Event(), listener._connect

        async def held_connect():  # keeps b deaf until the test has committed a change
            await reconnect.wait()
            return await connect()

        monkeypatch.setattr(listener, "_connect", held_connect)
        task = await submitted(a)
        await b.feed.wait("expiry", 0)  # a worker waits on it
        with b.feed.listen(task.id) as on_b:
            assert await a._fetch("SELECT pg_terminate_backend($1)", pid)
            await eventually(lambda: listener.conn is None)
            await a.transition(task.id, partial(cancel, now=time.time()))  # b misses this NOTIFY
            reconnect.set()
            # The catch-up after reconnecting republishes what changed meanwhile and wakes the workers.
            await reaches(on_b, TaskState.CANCELLED, timeout=10)
            assert await b.feed.wait("expiry", 5)
        assert listener.reconnects == 1 and listener.pid not in (None, pid)
        assert logs.events("store.listener_lost") and logs.events("store.listener_restored")
        later = await submitted(a)
        with b.feed.listen(later.id) as on_b:
            await a.transition(later.id, partial(cancel, now=time.time()))
            await reaches(on_b, TaskState.CANCELLED)  # and it listens again


@needs_postgres
async def test_postgres_the_listener_keeps_watching_after_a_catch_up_that_fails_unexpectedly(logs, monkeypatch) -> None:
    async with instances() as (a, b):
        listener = b._listener
        assert listener is not None
        catch_up = b._catch_up
        calls = 0

        async def broken_once(since: float) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("not a database error")
            await catch_up(since)

        monkeypatch.setattr(b, "_catch_up", broken_once)
        for lost in (1, 2):  # the first catch-up fails in a way nobody planned for; the watch goes on
            pid = listener.pid
            assert await a._fetch("SELECT pg_terminate_backend($1)", pid)
            await eventually(lambda lost=lost: listener.reconnects == lost and listener.conn is not None)
            assert listener.pid not in (None, pid)
        assert calls == 2
        assert [r.levelname for r in logs.records if r.getMessage() == "store.catch_up_failed"] == ["ERROR"]
        task = await submitted(a)
        with b.feed.listen(task.id) as on_b:
            await a.transition(task.id, partial(cancel, now=time.time()))
            await reaches(on_b, TaskState.CANCELLED)


@needs_postgres
async def test_postgres_watchers_hear_what_the_other_instances_store() -> None:
    async with instances() as (a, b):
        task = await submitted(a)
        with b.feed.watch() as on_b:
            logged, repeated = callback(task), callback(task)
            await a.record_callback(logged, Report(TaskState.RUNNING, task.upstream_task_id))
            await a.record_callback(repeated, Report(TaskState.RUNNING, task.upstream_task_id))  # a duplicate
            seen: list[object] = []

            def heard() -> tuple[set[str], list[TaskState]]:
                notices = {item.id for item in seen if isinstance(item, Notice)}
                # The task's creation may be heard late, after the watch began: not what is checked here.
                tasks = [item for item in seen if isinstance(item, Task)]
                return notices, [task.state for task in tasks if task.state is not TaskState.SUBMITTED]

            async with asyncio.timeout(5):
                while heard() != ({logged.id, repeated.id}, [TaskState.RUNNING]):
                    seen.append(await on_b.get())
            with contextlib.suppress(TimeoutError):  # and nothing more: the duplicate changed no task
                async with asyncio.timeout(0.3):
                    seen.append(await on_b.get())
        assert heard() == ({logged.id, repeated.id}, [TaskState.RUNNING])
