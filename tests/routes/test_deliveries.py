"""The delivery log API and redelivery."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.conftest import Running, start_receiver
from tests.delivery.helpers import FAST, deliveries, eventually, new_task, sink, subscribe
from tests.test_e2e import assert_error

pytestmark = pytest.mark.anyio


async def test_the_log_filters_pages_and_shows_attempts(tmp_path: Path) -> None:
    settings = {**FAST, "retry_schedule": (0.0,)}
    async with (
        sink() as (hook, url),
        sink(mode="fail") as (_, down_url),
        start_receiver(tmp_path, **settings) as running,
    ):
        up = await subscribe(running, url)
        down = await subscribe(running, down_url)
        tasks = [(await new_task(running))[0] for _ in range(3)]
        await eventually(lambda: _settled(running, 6))
        everything = (await running.api.get("/v1/deliveries")).json()
        assert len(everything["data"]) == 6 and everything["next_cursor"] is None
        ids = [d["id"] for d in everything["data"]]
        assert ids == sorted(ids, reverse=True)  # newest first

        failed = await deliveries(running, status="failed")
        assert {d["subscription_id"] for d in failed} == {down["id"]} and len(failed) == 3
        attempt = failed[0]["attempts"][0]
        assert attempt["status_code"] == 500 and attempt["error"] == "HTTP 500"
        assert "maintenance" in attempt["response_body"] and attempt["latency_ms"] >= 0
        assert {d["subscription_id"] for d in await deliveries(running, status="succeeded")} == {up["id"]}
        assert len(await deliveries(running, subscription_id=up["id"])) == 3
        one = await deliveries(running, task_id=tasks[0]["id"])
        assert {d["subscription_id"] for d in one} == {up["id"], down["id"]}

        page = (await running.api.get("/v1/deliveries", params={"limit": 4})).json()
        rest = (await running.api.get("/v1/deliveries", params={"limit": 4, "cursor": page["next_cursor"]})).json()
        assert [d["id"] for d in page["data"] + rest["data"]] == ids and rest["next_cursor"] is None

        shown = (await running.api.get(f"/v1/deliveries/{ids[0]}")).json()
        assert shown == everything["data"][0]
        assert len(hook.verified) == 3


async def _settled(running: Running, count: int):
    found = await deliveries(running)
    return found if len(found) == count and all(d["status"] != "pending" for d in found) else None


async def test_redeliver(tmp_path: Path) -> None:
    settings = {**FAST, "retry_schedule": (0.0,)}
    async with sink(mode="fail") as (hook, url), start_receiver(tmp_path, **settings) as running:
        sub = await subscribe(running, url)
        await new_task(running)
        [failed] = await eventually(lambda: _settled(running, 1))
        assert failed["status"] == "failed"
        hook.mode = "ok"
        again = await running.api.post(f"/v1/deliveries/{failed['id']}/retry")
        assert again.status_code == 202 and again.json()["status"] == "pending"
        await hook.wait_for(lambda _: len(hook.verified) == 1)
        assert hook.verified[0].webhook_id == failed["event_id"]
        [done] = await eventually(lambda: _settled(running, 1))
        assert done["status"] == "succeeded" and [a["status_code"] for a in done["attempts"]] == [500, 200]

        # A succeeded delivery can be sent again too (a subscriber lost it). Two retries at once (a
        # double click, two instances): one is taken, the other hears it is pending; one send.
        # (The second may also come after the first was sent and finished: then it sends again. What
        # never happens is two sends for one accepted retry; the store's test holds the race itself.)
        both = await asyncio.gather(*(running.api.post(f"/v1/deliveries/{done['id']}/retry") for _ in range(2)))
        taken = [r for r in both if r.status_code == 202]
        refused = [r.json()["error"]["code"] for r in both if r.status_code != 202]
        assert taken and refused in ([], ["delivery_pending"]), [r.text for r in both]
        await hook.wait_for(lambda _: len(hook.verified) == 1 + len(taken))
        await eventually(lambda: _settled(running, 1))
        assert len(hook.verified) == 1 + len(taken)

        await running.api.patch(f"/v1/subscriptions/{sub['id']}", json={"enabled": False})
        await eventually(lambda: _settled(running, 1))
        assert_error(await running.api.post(f"/v1/deliveries/{done['id']}/retry"), 409, "subscription_disabled")
        await running.api.delete(f"/v1/subscriptions/{sub['id']}")
        assert_error(await running.api.post(f"/v1/deliveries/{done['id']}/retry"), 409, "subscription_not_found")


async def test_a_pending_delivery_is_not_retried_twice(tmp_path: Path) -> None:
    settings = {**FAST, "retry_schedule": (0.0, 3600.0)}
    async with sink(mode="fail") as (_, url), start_receiver(tmp_path, **settings) as running:
        await subscribe(running, url)
        await new_task(running)
        [pending] = await eventually(lambda: _attempted(running))
        refused = assert_error(await running.api.post(f"/v1/deliveries/{pending['id']}/retry"), 409,
                               "delivery_pending")
        assert refused["error"]["details"]["next_attempt_at"] == pending["next_attempt_at"]


async def _attempted(running: Running):
    found = await deliveries(running)
    return found if found and found[0]["attempt_count"] == 1 else None


async def test_bad_queries_and_unknown_ids(local: Running) -> None:
    for params in ({"status": "lost"}, {"limit": 0}, {"limit": 101}, {"limit": "ten"}, {"cursor": "!!"}):
        assert_error(await local.api.get("/v1/deliveries", params=params), 400, "invalid_request")
    assert (await local.api.get("/v1/deliveries", params={"subscription_id": "sub_nope"})).json() == {
        "data": [], "next_cursor": None}
    assert_error(await local.api.get("/v1/deliveries/dlv_nope"), 404, "delivery_not_found")
    assert_error(await local.api.post("/v1/deliveries/dlv_nope/retry"), 404, "delivery_not_found")
