"""End to end over real sockets: the receiver and the fake provider on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from receiver.fakes.provider import FakeProvider
from receiver.server import free_port
from receiver.signing import CallbackSigner
from tests.conftest import Running, needs_postgres, postgres_database, start_receiver

pytestmark = pytest.mark.anyio

#: The representative round trips, run on SQLite and on PostgreSQL (the rest run on SQLite).
on_every_database = pytest.mark.parametrize(
    "database", ["sqlite", pytest.param("postgres", marks=needs_postgres)], indirect=True
)

BODY = {"provider": "xhuoapi", "model": "gpt-image-2", "prompt": "a red apple", "size": "1024x1024"}


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"error"} and body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body


async def submit_silent(running: Running, fake: FakeProvider, **extra: Any) -> tuple[dict[str, Any], str]:
    """Submit a task the fake never calls back; return it and the callback URL it was given."""
    answer = await running.api.post("/v1/tasks", json={**BODY, "prompt": "[silent] apple", **extra})
    assert answer.status_code == 202, answer.text
    task = answer.json()
    sent = [r for r in fake.requests if r["json"] and r["json"].get("prompt") == "[silent] apple"]
    return task, sent[-1]["json"]["callback_url"]


def success(upstream: str, url: str = "https://cdn.example/a.png") -> dict[str, Any]:
    return {"success": True, "task_id": upstream, "trace_id": "t", "data": {"created": 1, "data": [{"url": url}]}}


@on_every_database
async def test_submit_callback_and_status(running: Running, fake_provider: tuple[FakeProvider, str]) -> None:
    fake, _ = fake_provider
    answer = await running.api.post("/v1/tasks", json={**BODY, "metadata": {"order": 42}})
    assert answer.status_code == 202, answer.text
    task = answer.json()
    assert task["state"] == "submitted" and task["upstream_task_id"] and task["sequence"] == 2
    assert task["request"] == {"prompt": "a red apple", "size": "1024x1024"} and task["metadata"] == {"order": 42}

    upstream = fake.requests[-1]
    assert upstream["path"] == "/v1/openai/images/generations" and upstream["authorized"]
    assert upstream["json"]["callback_url"].startswith(f"{running.settings.public_url}/callbacks/")
    assert upstream["json"]["model"] == "gpt-image-2" and "provider" not in upstream["json"]

    done = (await running.api.get(f"/v1/tasks/{task['id']}", params={"wait": 10})).json()
    assert done["state"] == "succeeded" and done["sequence"] == 3 and done["completed_at"]
    assert done["result"]["images"][0]["url"].endswith(f"/images/{task['upstream_task_id']}_0.png")
    callbacks = (await running.api.get(f"/v1/tasks/{task['id']}/callbacks")).json()["data"]
    assert [(c["verdict"], c["duplicate"], c["ignored"]) for c in callbacks] == [("accepted", False, False)]
    assert callbacks[0]["body"]["task_id"] == task["upstream_task_id"]
    assert callbacks[0]["headers"]["content-type"] == "application/json"


async def test_the_callback_log_keeps_every_header_but_credentials(running: Running) -> None:
    minted = (await running.api.post("/v1/callback-urls", json={"provider": "xhuoapi"})).json()
    sent = [("X-Webhook-Signature", "v1=abc"), ("X-Webhook-Timestamp", "123"), ("Traceparent", "00-abc-def-01"),
            ("X-Custom", "one"), ("X-Custom", "two"), ("Authorization", "Bearer provider-key"),
            ("Cookie", "session=s"), ("X-Gitlab-Token", "t"), ("X-Webhook-Secret", "s"), ("X-My-Auth", "a"),
            ("X-Signature-Key", "k"), ("X-Access-Key", "k"),
            ("X-Receiver-Source", "poll"), ("Content-Type", "application/json")]
    async with httpx.AsyncClient() as raw:
        answer = await raw.post(minted["callback_url"], content=orjson.dumps(success("up-h")), headers=sent)
    assert answer.status_code == 200, answer.text
    [logged] = (await running.api.get(f"/v1/tasks/{minted['task']['id']}/callbacks")).json()["data"]
    headers = logged["headers"]
    assert headers["x-webhook-signature"] == "v1=abc" and headers["x-webhook-timestamp"] == "123"
    assert headers["traceparent"] == "00-abc-def-01" and headers["x-custom"] == "one, two"
    assert headers["content-type"] == "application/json" and "host" in headers
    # Credentials never; nor the mark of what the receiver fetched itself, which a caller could forge.
    assert not {"authorization", "cookie", "x-gitlab-token", "x-webhook-secret", "x-receiver-source", "x-my-auth",
                "x-signature-key", "x-access-key"} & set(headers)


async def test_a_failure_callback_fails_the_task(running: Running) -> None:
    task = (await running.api.post("/v1/tasks", json={**BODY, "prompt": "[fail] apple"})).json()
    done = (await running.api.get(f"/v1/tasks/{task['id']}", params={"wait": 10})).json()
    assert done["state"] == "failed" and done["error"]["code"] == "generation_failed"


@on_every_database
async def test_a_callback_before_the_submission_answer(running: Running) -> None:
    answer = await running.api.post("/v1/tasks", json={**BODY, "prompt": "[early] apple"})
    assert answer.status_code == 202
    task = answer.json()
    # The provider called back before answering: the task is already done, and it kept its upstream id.
    assert task["state"] == "succeeded" and task["upstream_task_id"]
    callbacks = (await running.api.get(f"/v1/tasks/{task['id']}/callbacks")).json()["data"]
    assert [c["verdict"] for c in callbacks] == ["accepted"]
    listed = (await running.api.get("/v1/tasks", params={"upstream_task_id": task["upstream_task_id"]})).json()
    assert [t["id"] for t in listed["data"]] == [task["id"]]


@on_every_database
async def test_duplicate_callbacks_change_nothing(running: Running, fake_provider) -> None:
    fake, _ = fake_provider
    task, url = await submit_silent(running, fake)
    body = success(task["upstream_task_id"])
    first = await running.post_callback(url, body)
    assert first.json() == {"ok": True, "task_id": task["id"], "duplicate": False}
    again = await running.post_callback(url, body)
    assert again.status_code == 200 and again.json()["duplicate"] is True
    after = (await running.api.get(f"/v1/tasks/{task['id']}")).json()
    assert after["state"] == "succeeded" and after["sequence"] == 3
    logged = (await running.api.get(f"/v1/tasks/{task['id']}/callbacks")).json()["data"]
    assert [c["duplicate"] for c in logged] == [False, True]


@on_every_database
async def test_the_callback_log_shows_each_body_byte_for_byte(running: Running, fake_provider) -> None:
    fake, _ = fake_provider
    task, url = await submit_silent(running, fake)
    # What parsing would change: a number past double precision, an escape, spacing, key order.
    raw = ('{ "task_id" : "' + task["upstream_task_id"] + '", "success":true, "trace_id":"t\\u0061",\n'
           ' "big": 12345678901234567890123, "data": {"created": 1, "data": [{"url": "https://cdn.example/a.png"}]}}')
    answer = await running.post_callback(url, content=raw.encode(), headers={"content-type": "application/json"})
    assert answer.status_code == 200, answer.text
    logged = (await running.api.get(f"/v1/tasks/{task['id']}/callbacks")).json()["data"]
    assert logged[0]["raw_body"] == raw and logged[0]["raw_body_encoding"] == "utf-8"
    assert logged[0]["body"]["trace_id"] == "ta" and logged[0]["body"]["task_id"] == task["upstream_task_id"]


@on_every_database
async def test_late_and_conflicting_callbacks_are_ignored(running: Running, fake_provider) -> None:
    fake, _ = fake_provider
    task, url = await submit_silent(running, fake)
    await running.post_callback(url, success(task["upstream_task_id"]))
    conflicting = {"success": False, "task_id": task["upstream_task_id"], "error": {"code": "x", "message": "y"}}
    answer = await running.post_callback(url, conflicting)
    assert answer.status_code == 200
    assert answer.json() == {"ok": True, "task_id": task["id"], "duplicate": False, "ignored": True,
                             "reason": "conflict"}
    assert (await running.api.get(f"/v1/tasks/{task['id']}")).json()["state"] == "succeeded"


async def test_the_callback_suffix_route(running: Running, fake_provider) -> None:
    fake, _ = fake_provider
    task, url = await submit_silent(running, fake)
    answer = await running.post_callback(url + "/callback", success(task["upstream_task_id"]))
    assert answer.status_code == 200 and answer.json()["task_id"] == task["id"]
    for slashed in (url + "/", url + "/callback/"):  # taken as they are: senders do not follow a POST's redirect
        again = await running.post_callback(slashed, success(task["upstream_task_id"]))
        assert again.status_code == 200 and again.json()["duplicate"] is True, again.text


@on_every_database
async def test_every_refusal_of_callback_ingress(running: Running, fake_provider) -> None:
    fake, _ = fake_provider
    task, url = await submit_silent(running, fake)
    token = url.rsplit("/", 1)[1]
    base = f"{running.url}/callbacks"
    keys = [str(k) for k in running.settings.secret_keys]

    assert_error(await running.post_callback(f"{base}/{token[:-2]}xx", success("x")), 403, "invalid_signature")
    assert_error(await running.post_callback(f"{base}/nonsense", success("x")), 403, "invalid_signature")
    foreign = CallbackSigner(["another-receivers-key"]).mint(task["id"], max_age=60)
    assert_error(await running.post_callback(f"{base}/{foreign}", success("x")), 403, "invalid_signature")

    old = CallbackSigner(keys, clock=lambda: time.time() - 120).mint(task["id"], max_age=60)
    assert_error(await running.post_callback(f"{base}/{old}", success("x")), 410, "callback_expired")

    ghost = CallbackSigner(keys).mint("tsk_01aaaaaaaaaaaaaaaaaaaaaaaa", max_age=60)
    assert_error(await running.post_callback(f"{base}/{ghost}", success("x")), 404, "task_not_found")

    assert_error(await running.post_callback(url, content=b"{not json"), 400, "invalid_payload")
    assert_error(await running.post_callback(url, [1, 2]), 400, "invalid_payload")
    assert_error(await running.post_callback(url, {"hello": "world"}), 400, "invalid_payload")
    assert_error(await running.post_callback(url, {"success": True, "data": "x"}), 400, "invalid_payload")
    assert_error(await running.post_callback(url, success("someone-else")), 409, "task_mismatch")

    # None of these stored anything.
    assert (await running.api.get(f"/v1/tasks/{task['id']}/callbacks")).json()["data"] == []
    assert (await running.api.get(f"/v1/tasks/{task['id']}")).json()["state"] == "submitted"
    metrics = (await running.api.get("/metrics")).text
    assert 'receiver_callbacks_total{outcome="invalid_signature"} 3.0' in metrics
    assert 'receiver_callbacks_total{outcome="task_mismatch"} 1.0' in metrics


async def test_oversized_callbacks_are_refused(tmp_path: Path, fake_provider) -> None:
    fake, provider_url = fake_provider
    async with start_receiver(tmp_path, provider_url=provider_url, max_body_bytes=2048) as running:
        task, url = await submit_silent(running, fake)
        big = success(task["upstream_task_id"], url="https://cdn.example/" + "a" * 4096)
        assert_error(await running.post_callback(url, big), 413, "payload_too_large")

        async def chunks():  # no content-length: the limit applies while reading
            for _ in range(8):
                yield b" " * 512

        async with httpx.AsyncClient() as raw:
            streamed = await raw.post(url, content=chunks(), headers={"content-type": "application/json"})
        assert_error(streamed, 413, "payload_too_large")
        fits = await running.post_callback(url, success(task["upstream_task_id"]))
        assert fits.status_code == 200


async def test_idempotent_submissions(running: Running, fake_provider) -> None:
    fake, _ = fake_provider
    headers = {"idempotency-key": "order-1"}
    first = await running.api.post("/v1/tasks", json=BODY, headers=headers)
    again = await running.api.post("/v1/tasks", json=BODY, headers=headers)
    assert (first.status_code, again.status_code) == (202, 200)
    assert first.json()["id"] == again.json()["id"]
    assert len([r for r in fake.requests if r["path"] == "/v1/openai/images/generations"]) == 1
    other = await running.api.post("/v1/tasks", json={**BODY, "prompt": "a pear"}, headers=headers)
    assert_error(other, 409, "idempotency_conflict")
    assert len(fake.requests) == 1
    assert_error(await running.api.post("/v1/tasks", json=BODY, headers={"idempotency-key": "x" * 300}),
                 400, "invalid_request")


@on_every_database
async def test_concurrent_retries_submit_once(running: Running, fake_provider) -> None:
    fake, _ = fake_provider
    headers = {"idempotency-key": "burst"}
    answers = await asyncio.gather(*(running.api.post("/v1/tasks", json=BODY, headers=headers) for _ in range(5)))
    assert len({a.json()["id"] for a in answers}) == 1
    assert sorted(a.status_code for a in answers) == [200, 200, 200, 200, 202]
    assert all(a.json()["state"] != "queued" for a in answers)
    assert len(fake.requests) == 1


@pytest.mark.parametrize("status", [400, 401, 402, 429, 500, 503])
async def test_provider_refusals_fail_the_task(running: Running, status: int) -> None:
    answer = await running.api.post("/v1/tasks", json={**BODY, "prompt": f"[refuse:{status}] apple"})
    assert answer.status_code == 502
    body = answer.json()
    assert body["error"]["details"]["status_code"] == status
    assert body["error"]["details"]["body"]["error"]["code"] == f"http_{status}"
    task = body["task"]
    assert task["state"] == "failed" and task["error"]["status_code"] == status
    stored = (await running.api.get(f"/v1/tasks/{task['id']}")).json()
    assert stored["state"] == "failed" and stored["error"] == task["error"]


async def test_an_unreachable_provider_fails_the_task(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    async with start_receiver(tmp_path, provider_url=closed) as running:
        answer = await running.api.post("/v1/tasks", json=BODY)
        body = assert_error(answer, 502, "upstream_unreachable")
        assert body["task"]["state"] == "failed"


@on_every_database
async def test_long_poll_answers_as_soon_as_the_task_ends(running: Running, fake_provider) -> None:
    fake, _ = fake_provider
    task, url = await submit_silent(running, fake)
    started = time.monotonic()
    waiting = asyncio.create_task(running.api.get(f"/v1/tasks/{task['id']}", params={"wait": 30}))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    await running.post_callback(url, success(task["upstream_task_id"]))
    done = (await asyncio.wait_for(waiting, 5)).json()
    assert done["state"] == "succeeded"
    assert time.monotonic() - started < 3


@needs_postgres
async def test_instances_on_one_database_answer_for_each_other(tmp_path: Path, fake_provider) -> None:
    fake, provider_url = fake_provider
    async with (
        postgres_database() as url,
        start_receiver(tmp_path / "a", provider_url=provider_url, database_url=url) as a,
        start_receiver(tmp_path / "b", provider_url=provider_url, database_url=url) as b,
    ):
        task, callback_url = await submit_silent(a, fake)
        waiting = asyncio.create_task(b.api.get(f"/v1/tasks/{task['id']}", params={"wait": 30}))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        await a.post_callback(callback_url, success(task["upstream_task_id"]))  # A takes the callback …
        done = (await asyncio.wait_for(waiting, 5)).json()  # … B's long-poll answers at once
        assert done["state"] == "succeeded"
        # The same callback through B is a duplicate of what A stored.
        again = await b.post_callback(callback_url.replace(a.url, b.url), success(task["upstream_task_id"]))
        assert again.json()["duplicate"] is True
        logged = (await a.api.get(f"/v1/tasks/{task['id']}/callbacks")).json()["data"]
        assert [c["duplicate"] for c in logged] == [False, True]


async def test_long_poll_gives_up_after_wait(running: Running, fake_provider) -> None:
    fake, _ = fake_provider
    task, _ = await submit_silent(running, fake)
    started = time.monotonic()
    shown = (await running.api.get(f"/v1/tasks/{task['id']}", params={"wait": 0.3})).json()
    assert shown["state"] == "submitted" and 0.25 < time.monotonic() - started < 3
    assert_error(await running.api.get(f"/v1/tasks/{task['id']}", params={"wait": 61}), 400, "invalid_request")
    assert_error(await running.api.get(f"/v1/tasks/{task['id']}", params={"wait": "soon"}), 400, "invalid_request")


@on_every_database
async def test_listing_with_filters_and_cursor(running: Running, fake_provider) -> None:
    fake, _ = fake_provider
    ids = []
    for _ in range(3):
        ids.append((await submit_silent(running, fake))[0]["id"])
        await asyncio.sleep(0.002)
    refused = (await running.api.post("/v1/tasks", json={**BODY, "prompt": "[refuse:402] x"})).json()["task"]
    page = (await running.api.get("/v1/tasks", params={"limit": 2})).json()
    assert [t["id"] for t in page["data"]] == [refused["id"], ids[2]] and page["next_cursor"]
    rest = (await running.api.get("/v1/tasks", params={"limit": 2, "cursor": page["next_cursor"]})).json()
    assert [t["id"] for t in rest["data"]] == [ids[1], ids[0]]
    assert rest["next_cursor"] is None  # a full last page does not send the client to an empty one
    failed = (await running.api.get("/v1/tasks", params={"state": "failed"})).json()
    assert [t["id"] for t in failed["data"]] == [refused["id"]] and failed["next_cursor"] is None
    assert (await running.api.get("/v1/tasks", params={"provider": "kling"})).json()["data"] == []
    assert_error(await running.api.get("/v1/tasks", params={"provider": "nobody"}), 400, "invalid_request")
    assert_error(await running.api.get("/v1/tasks", params={"state": "happy"}), 400, "invalid_request")
    assert_error(await running.api.get("/v1/tasks", params={"cursor": "!!"}), 400, "invalid_request")
    assert_error(await running.api.get("/v1/tasks", params={"limit": 0}), 400, "invalid_request")


@on_every_database
async def test_cancel(running: Running, fake_provider) -> None:
    fake, _ = fake_provider
    task, url = await submit_silent(running, fake)
    cancelled = await running.api.post(f"/v1/tasks/{task['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert_error(await running.api.post(f"/v1/tasks/{task['id']}/cancel"), 409, "task_terminal")
    late = await running.post_callback(url, success(task["upstream_task_id"]))
    assert late.status_code == 200 and late.json()["ignored"] is True
    assert (await running.api.get(f"/v1/tasks/{task['id']}")).json()["state"] == "cancelled"
    assert_error(await running.api.post("/v1/tasks/tsk_nope/cancel"), 404, "task_not_found")


async def test_bad_submissions_never_reach_the_provider(running: Running, fake_provider) -> None:
    fake, _ = fake_provider
    answer = await running.api.post("/v1/tasks", content=b"{oops", headers={"content-type": "application/json"})
    assert_error(answer, 400, "invalid_request")
    assert_error(await running.api.post("/v1/tasks", json=[1]), 400, "invalid_request")
    body = assert_error(
        await running.api.post("/v1/tasks", json={"provider": "xhuoapi", "model": "nope", "size": 5}),
        400,
        "invalid_parameters",
    )
    fields = {f["field"] for f in body["error"]["details"]["fields"]}
    assert fields == {"model", "prompt", "size"}
    assert_error(await running.api.post("/v1/tasks", json={**BODY, "provider": "acme"}), 400, "invalid_parameters")
    assert_error(await running.api.post("/v1/tasks", json={**BODY, "colour": "red"}), 400, "invalid_parameters")
    assert fake.requests == []


async def test_the_management_api_needs_a_key(running: Running) -> None:
    async with httpx.AsyncClient(base_url=running.url) as anonymous:
        for method, path in [("GET", "/v1/tasks"), ("POST", "/v1/tasks"), ("GET", "/v1/tasks/tsk_x"),
                             ("POST", "/v1/callback-urls"), ("GET", "/v1/whatever")]:
            assert_error(await anonymous.request(method, path), 401, "unauthorized")
            wrong = await anonymous.request(method, path, headers={"authorization": "Bearer nope"})
            assert_error(wrong, 401, "unauthorized")
            basic = await anonymous.request(method, path, headers={"authorization": "Basic dGVzdA=="})
            assert_error(basic, 401, "unauthorized")


@on_every_database
async def test_callback_urls_for_tasks_submitted_elsewhere(running: Running) -> None:
    minted = await running.api.post("/v1/callback-urls", json={"provider": "xhuoapi", "metadata": {"job": 1}})
    assert minted.status_code == 201
    task, url = minted.json()["task"], minted.json()["callback_url"]
    assert task["state"] == "submitted" and task["upstream_task_id"] is None and task["metadata"] == {"job": 1}
    first = await running.post_callback(url, success("their-task-1"))
    assert first.status_code == 200
    shown = (await running.api.get(f"/v1/tasks/{task['id']}")).json()
    assert shown["state"] == "succeeded" and shown["upstream_task_id"] == "their-task-1"
    assert_error(await running.post_callback(url, success("their-task-2")), 409, "task_mismatch")
    # Another minted task cannot take the upstream task the first one already has.
    other = (await running.api.post("/v1/callback-urls", json={"provider": "xhuoapi"})).json()
    taken = assert_error(await running.post_callback(other["callback_url"], success("their-task-1")), 409,
                         "task_mismatch")["error"]
    assert taken["details"]["reason"] == "upstream_task_taken" and task["id"] not in taken["message"]
    assert (await running.api.get(f"/v1/tasks/{other['task']['id']}")).json()["state"] == "submitted"

    auto = (await running.api.post("/v1/callback-urls", json={})).json()
    assert auto["task"]["provider"] == "auto"
    await running.post_callback(auto["callback_url"], success("t-9"))
    detected = (await running.api.get(f"/v1/tasks/{auto['task']['id']}")).json()
    assert detected["provider"] == "xhuoapi" and detected["state"] == "succeeded"

    bad = await running.api.post("/v1/callback-urls", json={"provider": "nobody", "expires_in": 5, "extra": 1})
    assert {f["field"] for f in assert_error(bad, 400, "invalid_parameters")["error"]["details"]["fields"]} == {
        "provider", "expires_in", "extra"}


@on_every_database
async def test_upstream_ids_no_database_holds_are_bad_input(running: Running) -> None:
    """A NUL (PostgreSQL text refuses it) or an id too long to index answered 503 on PostgreSQL,
    so the provider retried for ever; it is a 400 on every backend and nothing is stored."""
    for upstream in ["abc\x00def", "0123456789abcdef" * 1000]:
        minted = (await running.api.post("/v1/callback-urls", json={"provider": "kling"})).json()
        body = {"task_id": upstream, "task_status": "succeed", "task_status_msg": "",
                "task_result": {"images": [{"index": 0, "url": "https://cdn.example/a.png"}]}}
        assert_error(await running.post_callback(minted["callback_url"], body), 400, "invalid_payload")
        assert (await running.api.get(f"/v1/tasks/{minted['task']['id']}/callbacks")).json()["data"] == []
        fine = await running.post_callback(minted["callback_url"], {**body, "task_id": "k-1" + upstream[:3]})
        assert fine.status_code == 200 and fine.json()["duplicate"] is False, fine.text
        # Where no id would be bound, the contract's answers stand: another task's id on a task that
        # has one is a mismatch; anything after the result is ignored.
        again = await running.post_callback(minted["callback_url"], {**body, "task_status": "processing"})
        assert_error(again, 409, "task_mismatch")
        unbound = (await running.api.post("/v1/callback-urls", json={"provider": "kling"})).json()
        done = {**body, "task_id": None}
        assert (await running.post_callback(unbound["callback_url"], done)).status_code == 200
        late = await running.post_callback(unbound["callback_url"], {**body, "task_status": "processing"})
        assert late.status_code == 200 and late.json()["ignored"] is True, late.text


@on_every_database
async def test_operations_endpoints(running: Running) -> None:
    async with httpx.AsyncClient(base_url=running.url) as anonymous:
        assert (await anonymous.get("/healthz")).json() == {"status": "ok"}
        assert (await anonymous.get("/readyz")).json() == {"status": "ready"}
        document = (await anonymous.get("/openapi.json")).json()
        assert document["openapi"].startswith("3.") and "/v1/tasks" in document["paths"]
        metrics = await anonymous.get("/metrics")
        assert metrics.status_code == 200 and "receiver_tasks" in metrics.text
        assert_error(await anonymous.get("/nowhere"), 404, "not_found")
        assert_error(await anonymous.delete("/healthz"), 405, "method_not_allowed")


async def test_metrics_can_require_a_token(tmp_path: Path) -> None:
    from starlette.datastructures import Secret

    async with start_receiver(tmp_path, metrics_tokens=(Secret("m-token"),)) as running, httpx.AsyncClient(
        base_url=running.url
    ) as anonymous:
        assert_error(await anonymous.get("/metrics"), 401, "unauthorized")
        ok = await anonymous.get("/metrics", headers={"authorization": "Bearer m-token"})
        assert ok.status_code == 200
