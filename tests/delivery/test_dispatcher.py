"""Deliveries end to end: the receiver and subscriber sinks on real sockets on 127.0.0.1.

Retry schedules, timeouts and breaker pauses are compressed (helpers.FAST); no
test sleeps for long. Bounds on timing are generous: the machine may be busy.
"""

from __future__ import annotations

import asyncio
import random
import time
from functools import partial
from pathlib import Path

import pytest
import standardwebhooks
import svix.webhooks

from receiver.clock import parse_iso
from receiver.config import Secret
from receiver.delivery.dispatcher import decide
from receiver.delivery.schedule import RetrySchedule
from receiver.delivery.sender import Answer
from receiver.fakes.subscriber import Received
from receiver.store.base import Delivery, Subscription
from receiver.types import DeliveryStatus
from tests.conftest import NOTIFY_SECRET, needs_postgres, postgres_database, start_receiver
from tests.delivery.helpers import (
    FAST,
    SECRET,
    deliveries,
    eventually,
    new_task,
    set_running,
    sink,
    subscribe,
    succeed,
)

pytestmark = pytest.mark.anyio

#: The representative delivery tests, run on SQLite and on PostgreSQL (the rest run on SQLite).
on_every_database = pytest.mark.parametrize(
    "database", ["sqlite", pytest.param("postgres", marks=needs_postgres)], indirect=True
)


@on_every_database
async def test_every_change_reaches_subscribers_signed(tmp_path: Path, fake_provider, database_url: str) -> None:
    _, provider_url = fake_provider
    async with (
        sink() as (hook, url),
        sink(secrets=[NOTIFY_SECRET]) as (notified, notify_url),
        start_receiver(tmp_path, provider_url=provider_url, database_url=database_url, **FAST) as running,
    ):
        sub = await subscribe(running, url)
        task, callback_url = await new_task(running)
        await succeed(running, callback_url)
        await hook.wait_for(lambda _: len(hook.verified) == 2)
        assert [(r.type, r.sequence, r.task_id) for r in hook.verified] == [
            ("task.submitted", 1, task["id"]),
            ("task.succeeded", 2, task["id"]),
        ]
        for got in hook.verified:
            standardwebhooks.Webhook(SECRET).verify(got.body, got.headers)
            svix.webhooks.Webhook(SECRET).verify(got.body, got.headers)
            assert got.headers["content-type"] == "application/json" and got.webhook_id.startswith("evt_")
            assert abs(int(got.headers["webhook-timestamp"]) - time.time()) < 60
            assert set(got.event) == {"type", "timestamp", "data"} and got.event["data"]["id"] == task["id"]
        assert hook.verified[1].event["data"]["result"]["images"][0]["url"] == "https://cdn.example/a.png"

        # The delivery log shows each delivery with its attempt.
        logged = await eventually(
            lambda: _when_all(deliveries(running, subscription_id=sub["id"]), status="succeeded", count=2)
        )
        assert {d["event_id"] for d in logged} == {r.webhook_id for r in hook.verified}
        attempt = logged[0]["attempts"][0]
        assert attempt["status_code"] == 200 and attempt["error"] is None and attempt["latency_ms"] > 0
        assert attempt["response_body"] == '{"ok":true}' and parse_iso(attempt["at"]) <= time.time()

        # A task's notify_url gets that task's events alone, signed with RECEIVER_NOTIFY_SECRET.
        submitted = await running.api.post(
            "/v1/tasks",
            json={"provider": "xhuoapi", "model": "gpt-image-2", "prompt": "a pear", "notify_url": notify_url},
        )
        assert submitted.status_code == 202, submitted.text
        await notified.wait_for(lambda _: len(notified.verified) == 2)
        assert [r.type for r in notified.verified] == ["task.submitted", "task.succeeded"]
        assert {r.task_id for r in notified.verified} == {submitted.json()["id"]}
        svix.webhooks.Webhook(NOTIFY_SECRET).verify(notified.verified[0].body, notified.verified[0].headers)
        await hook.wait_for(lambda _: len(hook.verified) == 4)  # the global subscription saw it too

        # A ping reaches that subscription only.
        pinged = await running.api.post(f"/v1/subscriptions/{sub['id']}/test")
        assert pinged.status_code == 202 and pinged.json()["deliveries"] == 1
        await hook.wait_for(lambda _: any(r.type == "ping" for r in hook.verified))
        ping = next(r for r in hook.verified if r.type == "ping")
        assert ping.event["data"] == {"subscription_id": sub["id"]}
        assert all(r.type != "ping" for r in notified.received)

        metrics = (await running.api.get("/metrics")).text
        assert 'receiver_deliveries_total{outcome="succeeded"}' in metrics
        assert "receiver_delivery_latency_seconds_count" in metrics and "receiver_outbox_depth" in metrics


async def _when_all(listing, *, status: str, count: int):
    found = await listing
    return found if len(found) == count and all(d["status"] == status for d in found) else None


async def test_an_outage_then_recovery_delivers_everything(tmp_path: Path) -> None:
    settings = {**FAST, "retry_schedule": (0.0,) + (0.05,) * 30}
    async with sink(mode="fail", fail_status=503) as (hook, url), start_receiver(tmp_path, **settings) as running:
        await subscribe(running, url)
        tasks = [(await new_task(running))[0] for _ in range(3)]
        await hook.wait_for(lambda got: len([r for r in got if r.status == 503]) >= 6)
        hook.mode = "ok"
        await hook.wait_for(lambda _: len(hook.verified) == 3)
        assert {r.task_id for r in hook.verified} == {t["id"] for t in tasks}
        # Every attempt of one event carried the same webhook-id.
        failed_ids = {r.webhook_id for r in hook.received if r.status == 503}
        assert failed_ids <= {r.webhook_id for r in hook.verified}
        by_id: dict[str, set[str]] = {}
        for r in hook.received:
            by_id.setdefault(r.task_id or "", set()).add(r.webhook_id)
        assert all(len(ids) == 1 for ids in by_id.values())
        logged = await eventually(lambda: _when_all(deliveries(running), status="succeeded", count=3))
        assert sum(d["attempt_count"] for d in logged) == len(hook.received)
        retried = [a for d in logged for a in d["attempts"] if a["status_code"] == 503]
        assert retried and retried[0]["error"] == "HTTP 503" and "maintenance" in retried[0]["response_body"]


@on_every_database
async def test_pending_retries_survive_a_restart(tmp_path: Path, database_url: str) -> None:
    settings = {**FAST, "retry_schedule": (0.0, 0.3, 0.3), "delivery_timeout": 30.0, "database_url": database_url}
    async with sink(mode="fail") as (hook, url):
        async with start_receiver(tmp_path, **settings) as running:
            await subscribe(running, url)
            retrying, _ = await new_task(running)
            await hook.wait_for(lambda got: any(r.status == 500 for r in got))
            hook.mode = "hang"
            hanging, _ = await new_task(running)  # its first attempt is in flight at shutdown
            await hook.wait_for(lambda got: any(r.task_id == hanging["id"] for r in got))
        # The receiver is down; its in-flight attempt was handed back rather than left leased.
        hook.mode = "ok"
        hook.release()
        started = time.monotonic()
        async with start_receiver(tmp_path, **settings) as running:
            await hook.wait_for(lambda _: len(hook.verified) == 2, timeout=15)
            assert time.monotonic() - started < 15  # far sooner than the 65 s lease would have lapsed
            ids = {t: {r.webhook_id for r in hook.received if r.task_id == t} for t in (retrying["id"], hanging["id"])}
            assert all(len(webhook_ids) == 1 for webhook_ids in ids.values())  # same webhook-id after the restart
            done = await eventually(lambda: _when_all(deliveries(running), status="succeeded", count=2))
            logged = {d["task_id"]: d for d in done}
            assert logged[retrying["id"]]["attempt_count"] == 2
            assert [a["status_code"] for a in logged[retrying["id"]]["attempts"]] == [500, 200]


def _marked(got: Received, mark: str) -> bool:
    return bool(((got.event.get("data") or {}).get("metadata") or {}).get(mark))


@on_every_database
async def test_one_task_in_order_other_tasks_never_wait(tmp_path: Path, database_url: str) -> None:
    settings = {**FAST, "retry_schedule": (0.0,) + (0.05,) * 100, "database_url": database_url}
    hold = {"on": True}
    async with sink() as (hook, url), start_receiver(tmp_path, **settings) as running:
        hook.script = lambda got: 500 if hold["on"] and _marked(got, "hold") else None
        await subscribe(running, url)
        a, _ = await new_task(running, hold=True)  # its events fail until released
        await set_running(running, a["id"])
        b, _ = await new_task(running)
        await set_running(running, b["id"])
        await hook.wait_for(
            lambda _: [r.type for r in hook.verified if r.task_id == b["id"]] == ["task.submitted", "task.running"]
        )
        await hook.wait_for(lambda got: len([r for r in got if r.task_id == a["id"]]) >= 3)
        # a.running was never sent while a.submitted was still being retried.
        assert {r.type for r in hook.received if r.task_id == a["id"]} == {"task.submitted"}
        hold["on"] = False
        await hook.wait_for(lambda _: any(r.task_id == a["id"] and r.type == "task.running" for r in hook.verified))
        assert [r.type for r in hook.verified if r.task_id == a["id"]] == ["task.submitted", "task.running"]


async def test_an_exhausted_event_releases_the_next_one(tmp_path: Path) -> None:
    async with sink() as (hook, url), start_receiver(tmp_path, **FAST) as running:
        hook.script = lambda got: 500 if got.type == "task.submitted" and _marked(got, "doomed") else None
        await subscribe(running, url)
        a, _ = await new_task(running, doomed=True)
        await set_running(running, a["id"])
        await hook.wait_for(lambda _: any(r.task_id == a["id"] and r.type == "task.running" for r in hook.verified))
        attempts = [(r.type, r.status) for r in hook.received if r.task_id == a["id"]]
        assert attempts == [("task.submitted", 500)] * 3 + [("task.running", 200)]
        logged = {d["event_type"]: d for d in await eventually(lambda: _finished(running, a["id"]))}
        assert logged["task.submitted"]["status"] == "failed" and logged["task.submitted"]["attempt_count"] == 3
        assert logged["task.running"]["status"] == "succeeded"


async def _finished(running, task_id: str):
    found = await deliveries(running, task_id=task_id)
    return found if all(d["status"] != "pending" for d in found) else None


@on_every_database
async def test_a_dead_endpoint_does_not_slow_a_healthy_one(tmp_path: Path, database_url: str) -> None:
    settings = {
        **FAST,
        "database_url": database_url,
        "delivery_timeout": 2.0,
        "delivery_concurrency": 2,
        "breaker_failures": 2,
        "breaker_cooldown": 30.0,
    }
    async with (
        sink(mode="hang") as (dead, dead_url),
        sink() as (healthy, healthy_url),
        start_receiver(tmp_path, **settings) as running,
    ):
        dead_sub = await subscribe(running, dead_url)
        await subscribe(running, healthy_url)
        count = 12
        for _ in range(count):
            await new_task(running)
            await asyncio.sleep(0.1)  # events keep coming while the dead endpoint times out
        await healthy.wait_for(lambda _: len(healthy.verified) == count)
        latencies = [r.at - parse_iso(r.event["timestamp"]) for r in healthy.verified]
        # Each healthy delivery went at once, never behind the dead endpoint's 2 s timeouts
        # (typically a few milliseconds; the bound leaves room for a busy machine).
        assert max(latencies) < 1.0, latencies
        # The per-endpoint limit: before the first timeout, no more than 2 requests were open.
        first = dead.received[0].at
        assert len([r for r in dead.received if r.at < first + 1.9]) <= 2
        await eventually(lambda: _breaker_open(running, dead_sub["id"]))
        logged = await deliveries(running, subscription_id=dead_sub["id"])
        attempted = [d for d in logged if d["attempt_count"]]
        # Once paused, the dead endpoint's deliveries wait without spending their attempts.
        assert len(attempted) <= 4 and sum(d["attempt_count"] for d in logged) == len(dead.received)
        assert len(logged) == count and all(d["status"] == "pending" for d in logged)
        assert all(a["error"].startswith("timeout") for d in attempted for a in d["attempts"])


@needs_postgres
async def test_instances_on_one_database_share_the_deliveries(tmp_path: Path) -> None:
    async with (
        sink() as (hook, url),
        postgres_database() as database_url,
        start_receiver(tmp_path / "a", database_url=database_url, **FAST) as a,
        start_receiver(tmp_path / "b", database_url=database_url, **FAST) as b,
    ):
        await subscribe(a, url)
        tasks = [(await new_task(a if i % 2 else b))[0] for i in range(20)]
        await hook.wait_for(lambda _: len(hook.verified) == 20)
        await asyncio.sleep(0.2)  # a second copy of any event would have arrived by now
        assert sorted(r.task_id for r in hook.received) == sorted(t["id"] for t in tasks)  # each event once


async def _breaker_open(running, subscription_id: str) -> bool:
    dispatcher = running.app.state.dispatcher
    breaker = dispatcher.breaker(subscription_id)
    return breaker is not None and breaker.open_until is not None and dispatcher.in_flight == 0


async def test_a_paused_endpoint_is_probed_then_resumes(tmp_path: Path) -> None:
    settings = {**FAST, "retry_schedule": (0.0,) + (0.05,) * 50, "breaker_failures": 2, "breaker_cooldown": 0.3}
    async with sink(mode="fail") as (hook, url), start_receiver(tmp_path, **settings) as running:
        sub = await subscribe(running, url)
        for _ in range(4):
            await new_task(running)
        await hook.wait_for(lambda got: len(got) >= 2)
        await eventually(lambda: _breaker_open(running, sub["id"]))
        until = running.app.state.dispatcher.breaker(sub["id"]).open_until
        paused_at = len(hook.received)
        hook.mode = "ok"
        await hook.wait_for(lambda _: len(hook.verified) == 4)
        # Nothing was sent while paused; then one probe went alone, and once it succeeded, the rest.
        assert all(r.at >= until - 0.01 for r in hook.received[paused_at:])
        probe, rest = hook.received[paused_at], hook.received[paused_at + 1 :]
        assert probe.status == 200 and all(r.at >= probe.at for r in rest)
        logged = await eventually(lambda: _when_all(deliveries(running), status="succeeded", count=4))
        assert sum(d["attempt_count"] for d in logged) == len(hook.received)  # a pause spends no attempt


@on_every_database
async def test_a_retry_asked_for_goes_now_even_to_a_paused_endpoint(tmp_path: Path, database_url: str) -> None:
    """`POST /v1/deliveries/{id}/retry` sends now: on a paused endpoint it is the probe (the pause
    here would last an hour), and its success resumes the endpoint for what waited behind it."""
    settings = {**FAST, "database_url": database_url, "retry_schedule": (0.0,),
                "breaker_failures": 2, "breaker_cooldown": 3600.0}
    async with sink(mode="fail") as (hook, url), start_receiver(tmp_path, **settings) as running:
        sub = await subscribe(running, url)
        first, _ = await new_task(running)
        second, _ = await new_task(running)
        await hook.wait_for(lambda got: len(got) == 2)
        await eventually(lambda: _breaker_open(running, sub["id"]))
        waiting, _ = await new_task(running)  # its delivery waits on the paused endpoint
        await asyncio.sleep(0.2)
        assert len(hook.received) == 2
        [failed] = await eventually(lambda: _when_all(deliveries(running, task_id=first["id"]), status="failed",
                                                      count=1))
        hook.mode = "ok"
        again = await running.api.post(f"/v1/deliveries/{failed['id']}/retry")
        assert again.status_code == 202, again.text
        await hook.wait_for(lambda _: len(hook.verified) >= 1, timeout=5)
        assert hook.verified[0].webhook_id == failed["event_id"]
        # The endpoint answered: it is resumed, and the delivery that waited goes too.
        await hook.wait_for(lambda _: waiting["id"] in {r.task_id for r in hook.verified}, timeout=5)
        assert running.app.state.dispatcher.breaker(sub["id"]) is None or not running.app.state.dispatcher.breaker(
            sub["id"]).open_until
        [done] = await eventually(lambda: _when_all(deliveries(running, task_id=first["id"]), status="succeeded",
                                                    count=1))
        assert [a["status_code"] for a in done["attempts"]][-1] == 200
        [other] = await deliveries(running, task_id=second["id"])
        assert other["status"] == "failed" and other["attempt_count"] == 1  # not asked for: not sent again


async def test_410_gone_disables_the_subscription(tmp_path: Path) -> None:
    async with sink(mode="gone") as (hook, url), start_receiver(tmp_path, **FAST) as running:
        sub = await subscribe(running, url)
        await new_task(running)
        shown = await eventually(lambda: _disabled(running, sub["id"]))
        assert "410" in shown["disabled_reason"]
        [delivery] = await deliveries(running, subscription_id=sub["id"])
        assert delivery["status"] == "failed" and delivery["attempt_count"] == 1
        await new_task(running)  # a disabled subscription gets no new deliveries
        assert len(await deliveries(running, subscription_id=sub["id"])) == 1
        enabled = await running.api.patch(f"/v1/subscriptions/{sub['id']}", json={"enabled": True})
        assert enabled.json()["enabled"] is True and enabled.json()["disabled_reason"] is None
        assert len(hook.received) == 1


async def _disabled(running, subscription_id: str):
    shown = (await running.api.get(f"/v1/subscriptions/{subscription_id}")).json()
    return shown if not shown["enabled"] else None


async def test_a_subscription_failing_for_disable_after_is_disabled(tmp_path: Path) -> None:
    settings = {**FAST, "retry_schedule": (0.0,) + (0.05,) * 100, "disable_after": 0.4}
    async with sink(mode="fail") as (hook, url), start_receiver(tmp_path, **settings) as running:
        sub = await subscribe(running, url)
        task, _ = await new_task(running)
        shown = await eventually(lambda: _disabled(running, sub["id"]))
        assert shown["disabled_reason"].startswith("every delivery failed") and shown["failing_since"]
        first, last = hook.received[0].at, hook.received[-1].at
        assert last - first >= 0.35
        [held] = await deliveries(running, subscription_id=sub["id"])
        assert held["status"] == "pending"  # kept, not thrown away: it goes once re-enabled
        sent = len(hook.received)
        await asyncio.sleep(0.2)
        assert len(hook.received) == sent
        hook.mode = "ok"
        enabled = await running.api.patch(f"/v1/subscriptions/{sub['id']}", json={"enabled": True})
        assert enabled.json()["failing_since"] is None
        await hook.wait_for(lambda _: [r.task_id for r in hook.verified] == [task["id"]])


class OffsetClock:
    """Real time plus an offset the test moves (signature checks compare with real time)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


async def test_a_rotated_secret_keeps_verifying_for_24_hours(tmp_path: Path) -> None:
    clock = OffsetClock()
    async with sink() as (hook, url), start_receiver(tmp_path, clock=clock, **FAST) as running:
        sub = await subscribe(running, url)
        rotated = await running.api.post(f"/v1/subscriptions/{sub['id']}/rotate-secret")
        assert rotated.status_code == 200
        new_secret = rotated.json()["secret"]
        assert new_secret.startswith("whsec_") and new_secret != SECRET
        assert parse_iso(rotated.json()["previous_secret_expires_at"]) == pytest.approx(clock() + 86400, abs=5)
        assert (await running.api.get(f"/v1/subscriptions/{sub['id']}")).json()["secret"] == new_secret[:10] + "…"

        await new_task(running)
        await hook.wait_for(lambda _: len(hook.verified) == 1)  # the sink still only knows the old secret
        during = hook.verified[0]
        assert len(during.headers["webhook-signature"].split(" ")) == 2
        standardwebhooks.Webhook(new_secret).verify(during.body, during.headers)
        svix.webhooks.Webhook(SECRET).verify(during.body, during.headers)

        clock.offset = 86400 + 60  # the overlap is over
        hook.secrets = []  # its timestamps are a day ahead of real time now: check the signature by hand
        await new_task(running)
        await hook.wait_for(lambda got: len(got) == 2)
        after = hook.received[1]
        timestamp = int(after.headers["webhook-timestamp"])
        assert timestamp == pytest.approx(clock(), abs=5)
        expected = _sign(new_secret, after)
        assert after.headers["webhook-signature"] == expected  # one signature, the new secret's
        assert _sign(SECRET, after) != expected


async def test_a_notify_secret_being_rotated_signs_with_both(tmp_path: Path, fake_provider) -> None:
    """RECEIVER_NOTIFY_SECRET=new,old: a notify_url endpoint that knows either secret verifies."""
    new = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"
    rotating = Secret(f"{new},{NOTIFY_SECRET}")
    async with (
        sink(secrets=[NOTIFY_SECRET]) as (old_side, old_url),
        sink(secrets=[new]) as (new_side, new_url),
        start_receiver(tmp_path, provider_url=fake_provider[1], notify_secret=rotating, **FAST) as running,
    ):
        for notify_url in (old_url, new_url):
            body = {"provider": "xhuoapi", "model": "gpt-image-2", "prompt": "a pear", "notify_url": notify_url}
            assert (await running.api.post("/v1/tasks", json=body)).status_code == 202
        await old_side.wait_for(lambda got: len(got) >= 1)
        await new_side.wait_for(lambda got: len(got) >= 1)
        for got in (old_side.received[0], new_side.received[0]):
            assert got.verified, got.error
            assert got.headers["webhook-signature"] == " ".join(_sign(key, got) for key in (new, NOTIFY_SECRET))
            standardwebhooks.Webhook(new).verify(got.body, got.headers)
            svix.webhooks.Webhook(NOTIFY_SECRET).verify(got.body, got.headers)


def _sign(secret: str, got: Received) -> str:
    from receiver.delivery.signing import sign

    return sign(got.webhook_id, int(got.headers["webhook-timestamp"]), got.body, secret)


# --- the decision, on its own -----------------------------------------------------------


def _delivery(attempts: int = 0) -> Delivery:
    return Delivery(
        id="dlv_1", event_id="evt_1", subscription_id="sub_1", task_id="tsk_1", event_type="task.succeeded",
        sequence=3, status=DeliveryStatus.PENDING, attempt_count=attempts, next_attempt_at=0.0,
        created_at=0.0, updated_at=0.0,
    )


def _subscription(failing_since: float | None = None) -> Subscription:
    return Subscription(
        id="sub_1", url="https://example.com", events=("*",), secret=SECRET, created_at=0.0, updated_at=0.0,
        failing_since=failing_since,
    )


class _NoJitter(random.Random):
    def uniform(self, a, b):
        return 1.0


SCHEDULE = RetrySchedule((0, 5, 300), rng=_NoJitter())


@pytest.mark.parametrize(
    ("answer", "attempts", "failing_since", "status", "next_at", "disabled"),
    [
        pytest.param(Answer(200, 3.0), 0, None, "succeeded", None, None, id="2xx"),
        pytest.param(Answer(204, 3.0), 2, 0.0, "succeeded", None, None, id="2xx-after-failures"),
        pytest.param(Answer(500, 3.0, "HTTP 500"), 0, None, "pending", 1005.0, None, id="5xx-retries"),
        pytest.param(Answer(None, 10000.0, "timeout"), 1, None, "pending", 1300.0, None, id="timeout-retries"),
        pytest.param(Answer(302, 1.0, "HTTP 302: redirects are not followed"), 0, None, "pending", 1005.0, None,
                     id="redirect-retries"),
        pytest.param(Answer(500, 3.0, "HTTP 500"), 2, None, "failed", None, None, id="exhausted"),
        pytest.param(Answer(410, 3.0, "HTTP 410"), 0, None, "failed", None, "410", id="gone"),
        pytest.param(Answer(429, 3.0, "HTTP 429", retry_after="60"), 0, None, "pending", 1060.0, None,
                     id="retry-after-429"),
        pytest.param(Answer(503, 3.0, "HTTP 503", retry_after="2"), 0, None, "pending", 1005.0, None,
                     id="short-retry-after-keeps-schedule"),
        pytest.param(Answer(500, 3.0, "HTTP 500", retry_after="60"), 0, None, "pending", 1005.0, None,
                     id="retry-after-only-for-429-503"),
        pytest.param(Answer(500, 3.0, "HTTP 500"), 0, 1000.0 - 86400 * 5, "pending", 1005.0, "every delivery failed",
                     id="failing-too-long"),
        pytest.param(Answer(500, 3.0, "HTTP 500"), 0, 1000.0 - 3600, "pending", 1005.0, None,
                     id="failing-not-long-enough"),
    ],
)
def test_what_an_attempt_decides(answer, attempts, failing_since, status, next_at, disabled) -> None:
    outcome = decide(
        _delivery(attempts), _subscription(failing_since), answer, started=990.0, ended=1000.0,
        schedule=SCHEDULE, disable_after=5 * 86400,
    )
    assert outcome.status.value == status and outcome.next_attempt_at == next_at
    assert (outcome.disable is None) if disabled is None else (disabled in (outcome.disable or ""))
    assert outcome.attempt.at == 990.0 and outcome.attempt.status_code == answer.status_code
    assert outcome.attempt.error == answer.error and outcome.attempt.latency_ms == answer.latency_ms


# --- the dispatcher's steps, with an injected clock and a scripted sender --------------


class ScriptedSender:
    """Answers from a script; `gate` (when set) holds every request until released."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers)
        self.sent: list[tuple[str, dict[str, str]]] = []
        self.gate: asyncio.Event | None = None

    async def send(self, url, body, headers, *, timeout):
        self.sent.append((url, dict(headers)))
        if self.gate is not None:
            await self.gate.wait()
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]

    async def aclose(self) -> None:
        pass


@pytest.fixture
async def bench(tmp_path: Path):
    """A dispatcher on a real SQLite store, with a FakeClock, no HTTP and no worker loop."""
    from receiver.clock import FakeClock
    from receiver.context import Context
    from receiver.delivery.dispatcher import Dispatcher
    from receiver.delivery.urlguard import UrlGuard
    from receiver.metrics import Metrics
    from receiver.signing import CallbackSigner
    from receiver.store.sqlite import SQLiteStore
    from tests.conftest import make_settings

    clock = FakeClock(time.time())
    store = SQLiteStore(tmp_path / "bench.db", clock=clock)
    await store.open()

    async def make(sender, **settings):
        ctx = Context(
            settings=make_settings(tmp_path, **settings), store=store, clock=clock, http=None, providers=None,
            signer=CallbackSigner(["k"], clock=clock), metrics=Metrics(), signatures=None, assets=None,
            url_guard=UrlGuard(allow_private=True),
        )
        return Dispatcher(ctx, sender, rng=_NoJitter()), clock, store

    yield make
    await store.close()


async def _event(store, clock, sub_id: str | None = None) -> None:
    from receiver.ids import new_id
    from receiver.tasks import Task
    from receiver.types import EventType, TaskState

    task = Task(id=new_id("tsk"), provider="xhuoapi", model="m", state=TaskState.SUBMITTED, request={},
                created_at=clock(), updated_at=clock(), expires_at=clock() + 3600)
    await store.create_task(task, events=(EventType.SUBMITTED,))


async def _subscribe(store, clock) -> Subscription:
    from receiver.ids import new_id

    sub = Subscription(id=new_id("sub"), url="http://127.0.0.1:9/hook", events=("*",), secret=SECRET,
                       created_at=clock(), updated_at=clock())
    return await store.create_subscription(sub)


async def _settle(dispatcher) -> None:
    """Wait for every send the dispatcher started, written to the store included."""
    await asyncio.gather(*list(dispatcher._sends))


async def test_a_step_sleeps_until_the_next_retry_on_the_injected_clock(bench) -> None:
    sender = ScriptedSender(Answer(500, 1.0, "HTTP 500"), Answer(200, 1.0))
    dispatcher, clock, store = await bench(sender, retry_schedule=(0.0, 60.0))
    await _subscribe(store, clock)
    await _event(store, clock)
    await dispatcher.step()  # starts the first attempt
    await _settle(dispatcher)
    assert await dispatcher.step() == pytest.approx(60.0, abs=0.01)  # the retry, 60 s away by the fake clock
    assert len(sender.sent) == 1
    clock.advance(60)
    await dispatcher.step()
    await _settle(dispatcher)
    assert len(sender.sent) == 2 and sender.sent[0][1]["webhook-id"] == sender.sent[1][1]["webhook-id"]
    assert sender.sent[1][1]["webhook-timestamp"] == str(int(clock()))
    assert await dispatcher.step() is None  # nothing left: sleep until woken


async def test_a_full_endpoint_is_left_alone_without_spinning(bench) -> None:
    sender = ScriptedSender(Answer(200, 1.0))
    sender.gate = asyncio.Event()
    dispatcher, clock, store = await bench(sender, delivery_concurrency=1)
    sub = await _subscribe(store, clock)
    for _ in range(3):
        await _event(store, clock)
    await dispatcher.step()
    await asyncio.sleep(0.01)
    assert len(sender.sent) == 1 and dispatcher.in_flight == 1
    # The other two went back unclaimed, and with the endpoint full nothing is due for this dispatcher.
    assert await dispatcher.step() is None
    assert len(sender.sent) == 1
    assert await store.next_delivery_due(exclude_subscriptions=[sub.id]) is None
    sender.gate.set()
    for _ in range(3):
        await _settle(dispatcher)
        await dispatcher.step()
    await _settle(dispatcher)
    assert len(sender.sent) == 3


async def test_an_open_breaker_pauses_by_the_injected_clock_and_spends_no_attempt(bench) -> None:
    sender = ScriptedSender(Answer(None, 1.0, "connection failed"), Answer(200, 1.0))
    dispatcher, clock, store = await bench(
        sender, retry_schedule=(0.0, 0.0, 0.0), breaker_failures=1, breaker_cooldown=100.0
    )
    sub = await _subscribe(store, clock)
    await _event(store, clock)
    await dispatcher.step()
    await _settle(dispatcher)
    assert len(sender.sent) == 1  # failed: the breaker opened
    await _event(store, clock)
    assert await dispatcher.step() == pytest.approx(100.0, abs=0.01)  # both are due, yet it sleeps until the probe
    assert len(sender.sent) == 1
    clock.advance(100)
    sender.gate = asyncio.Event()  # hold the probe
    await dispatcher.step()
    await asyncio.sleep(0.01)
    assert len(sender.sent) == 2 and dispatcher.in_flight == 1  # one probe alone; the other waits
    sender.gate.set()
    await _settle(dispatcher)
    await dispatcher.step()
    await _settle(dispatcher)
    assert len(sender.sent) == 3
    assert dispatcher.breaker(sub.id) is None  # closed again and forgotten
    from receiver.store.base import DeliveryQuery

    done = await store.list_deliveries(DeliveryQuery(subscription_id=sub.id))
    assert all(d.status is DeliveryStatus.SUCCEEDED for d in done)
    assert sum(d.attempt_count for d in done) == len(sender.sent)


async def test_offered_deliveries_go_at_once_and_what_an_endpoint_cannot_take_goes_back(bench) -> None:
    from receiver.ids import new_id
    from receiver.tasks import Task, record_submission
    from receiver.types import TaskState

    sender = ScriptedSender(Answer(200, 1.0))
    sender.gate = asyncio.Event()
    dispatcher, clock, store = await bench(sender, delivery_concurrency=1)
    await _subscribe(store, clock)
    dispatcher.start()
    try:
        for _ in range(4):
            task = Task(id=new_id("tsk"), provider="xhuoapi", model="m", state=TaskState.QUEUED, request={},
                        created_at=clock(), updated_at=clock(), expires_at=clock() + 3600)
            await store.create_task(task)
            applied = await store.transition(
                task.id, partial(record_submission, upstream_task_id=f"up-{task.id}", now=clock())
            )
            assert len(applied.offered) == 1  # leased at creation, handed over without a claim
        await asyncio.sleep(0.01)
        assert len(sender.sent) == 1 and dispatcher.in_flight == 1  # the endpoint takes one at a time
        await asyncio.gather(*dispatcher._chores)
        # Two wait in the endpoint's queue (two rounds of its capacity); the fourth went back to the
        # outbox for anyone to claim, and the endpoint's new deliveries now join it there, in order.
        [back] = await store.claim_deliveries(now=clock() + 1, limit=10, owner="other", lease_seconds=30)
        await store.release_deliveries([back.delivery.id], "other")
        sender.gate.set()
        for _ in range(3):
            await _settle(dispatcher)
        assert len(sender.sent) == 3
        await dispatcher.step()
        await _settle(dispatcher)
        assert len(sender.sent) == 4
    finally:
        await dispatcher.close()
