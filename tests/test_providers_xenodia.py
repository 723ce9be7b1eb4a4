"""xenodia: submission (JSON and multipart), the task object, and polling end to end."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.datastructures import Secret

from receiver.config import ProviderSettings
from receiver.errors import InvalidPayload, ProviderError
from receiver.fakes.provider import PNG, FakeProvider
from receiver.providers.xenodia import XenodiaProvider, XenodiaTaskDialect
from receiver.server import serve_in_background
from receiver.tasks import Task
from receiver.types import TaskState
from tests.conftest import Running, needs_postgres, start_receiver

BODY = {"provider": "xenodia", "model": "nano-banana-pro", "prompt": "a lighthouse", "aspect_ratio": "16:9",
        "resolution": "2K"}
FAST = {"poll_interval": 0.02, "poll_max_interval": 0.1}
ENVELOPE = {"task_id": "task_123", "object": "task", "model": "nano-banana-pro", "type": "image",
            "state": "waiting", "created_at": 1760000000, "poll_url": "/v1/tasks/task_123"}


@pytest.mark.parametrize(
    ("payload", "state", "images"),
    [
        pytest.param({**ENVELOPE}, TaskState.SUBMITTED, (), id="waiting"),
        pytest.param({**ENVELOPE, "state": "running"}, TaskState.RUNNING, (), id="running"),
        pytest.param({**ENVELOPE, "state": "processing"}, TaskState.RUNNING, (), id="processing"),
        pytest.param({**ENVELOPE, "state": "succeeded", "data": [{"url": "https://cdn.example/a.png"}]},
                     TaskState.SUCCEEDED, ({"url": "https://cdn.example/a.png"},), id="succeeded-data"),
        pytest.param({**ENVELOPE, "state": "completed", "result": {"data": [{"url": "https://cdn.example/b.png"}]}},
                     TaskState.SUCCEEDED, ({"url": "https://cdn.example/b.png"},), id="completed-result-data"),
        pytest.param({**ENVELOPE, "state": "succeeded", "data": []}, TaskState.FAILED, (), id="succeeded-empty"),
    ],
)
def test_the_task_object(payload: dict[str, Any], state: TaskState, images: tuple[Any, ...]) -> None:
    report = XenodiaTaskDialect().parse(payload)
    assert (report.state, report.upstream_task_id, report.images) == (state, "task_123", images)


def test_a_failed_task_keeps_its_error() -> None:
    report = XenodiaTaskDialect().parse({**ENVELOPE, "state": "failed",
                                         "error": {"code": "content_policy", "message": "refused"}})
    assert report.state is TaskState.FAILED and report.error == {"code": "content_policy", "message": "refused"}
    with pytest.raises(InvalidPayload):
        XenodiaTaskDialect().parse({**ENVELOPE, "state": "dreaming"})
    with pytest.raises(InvalidPayload):
        XenodiaTaskDialect().parse({"task_id": "x"})


def _task(**request: Any) -> Task:
    return Task(id="tsk_1", provider="xenodia", model="gpt-image-2", state=TaskState.QUEUED,
                request={"prompt": "p", **request}, created_at=0, updated_at=0, expires_at=1)


async def _provider(handler) -> tuple[XenodiaProvider, httpx.AsyncClient]:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    settings = ProviderSettings(url="https://api.xenodia.test", api_key=Secret("xk"))
    return XenodiaProvider(settings, client, timeout=5), client


@pytest.mark.anyio
async def test_json_submission_and_poll() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.method == "POST":
            return httpx.Response(202, json=ENVELOPE)
        return httpx.Response(200, json={**ENVELOPE, "state": "running"})

    provider, client = await _provider(handler)
    async with client:
        submission = await provider.submit(_task(aspect_ratio="16:9", image_input=["https://a/1.png"]), "unused")
        assert (submission.upstream_task_id, submission.poll_url, submission.report) == (
            "task_123", "/v1/tasks/task_123", None)
        sent = orjson.loads(seen[0].content)
        assert str(seen[0].url) == "https://api.xenodia.test/v1/images/generations"
        assert sent == {"model": "gpt-image-2", "prompt": "p", "aspect_ratio": "16:9",
                        "image_input": ["https://a/1.png"], "async": True, "response_format": "url"}
        assert seen[0].headers["authorization"] == "Bearer xk"
        answer, report = await provider.poll(submission.poll_url)
        assert str(seen[1].url) == "https://api.xenodia.test/v1/tasks/task_123" and seen[1].method == "GET"
        assert seen[1].headers["authorization"] == "Bearer xk"
        assert report.state is TaskState.RUNNING and answer.payload["state"] == "running"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("poll_url", "expected"),
    [
        pytest.param("/v1/tasks/task_123", "/v1/tasks/task_123", id="relative"),
        pytest.param("https://api.xenodia.test/v1/tasks/task_123", "/v1/tasks/task_123", id="absolute-same-host"),
        pytest.param("https://evil.example/v1/tasks/task_123", "/v1/tasks/task_123", id="another-host-ignored"),
        pytest.param("https://api.xenodia.test.evil.example/x", "/v1/tasks/task_123", id="lookalike-host-ignored"),
        pytest.param("//evil.example/x", "/v1/tasks/task_123", id="scheme-relative-ignored"),
        pytest.param(None, "/v1/tasks/task_123", id="missing"),
    ],
)
async def test_the_poll_url_never_leaves_the_provider(poll_url: str | None, expected: str) -> None:
    provider, client = await _provider(lambda r: httpx.Response(202, json={**ENVELOPE, "poll_url": poll_url}))
    async with client:
        assert (await provider.submit(_task(), "unused")).poll_url == expected


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("response", "code"),
    [
        pytest.param(httpx.Response(402, json={"error": {"code": "billing", "message": "top up"}}),
                     "upstream_billing", id="402"),
        pytest.param(httpx.Response(202, json={"object": "task"}), "upstream_garbled", id="no-task-id"),
        pytest.param(httpx.Response(202, json={"task_id": True}), "upstream_garbled", id="task-id-boolean"),
        pytest.param(httpx.Response(202, content=b"<html>"), "upstream_garbled", id="not-json"),
    ],
)
async def test_refusals(response: httpx.Response, code: str) -> None:
    provider, client = await _provider(lambda r: response)
    async with client:
        with pytest.raises(ProviderError) as caught:
            await provider.submit(_task(), "unused")
    assert caught.value.code == code


@pytest.mark.anyio
async def test_a_synchronous_answer_is_a_result() -> None:
    provider, client = await _provider(
        lambda r: httpx.Response(200, json={"created": 1, "data": [{"url": "https://cdn.example/a.png"}]}))
    async with client:
        submission = await provider.submit(_task(), "unused")
    assert submission.report is not None and submission.report.state is TaskState.SUCCEEDED
    assert submission.poll_url is None


# --- end to end over real sockets ----------------------------------------------------------


async def finished(running: Running, task_id: str) -> dict[str, Any]:
    return (await running.api.get(f"/v1/tasks/{task_id}", params={"wait": 20})).json()


@pytest.mark.anyio
@pytest.mark.parametrize("database", ["sqlite", pytest.param("postgres", marks=needs_postgres)], indirect=True)
async def test_polling_until_the_task_succeeds(tmp_path: Path, database: str, database_url: str) -> None:
    fake = FakeProvider(delay=0.3)
    async with serve_in_background(fake.app) as url, start_receiver(
        tmp_path, provider_url=url, database_url=database_url, **FAST
    ) as running:
        answer = await running.api.post("/v1/tasks", json=BODY)
        assert answer.status_code == 202, answer.text
        task = answer.json()
        assert task["state"] == "submitted" and task["upstream_task_id"].startswith("task_")
        done = await finished(running, task["id"])
        assert done["state"] == "succeeded" and done["sequence"] == 4  # queued, submitted, running, succeeded
        assert done["result"]["images"][0]["url"] == f"{url}/images/{task['upstream_task_id']}_0.png"
        submitted = fake.requests[0]
        assert submitted["path"] == "/v1/images/generations" and submitted["authorized"]
        assert submitted["json"]["async"] is True and submitted["json"]["response_format"] == "url"
        assert "callback_url" not in submitted["json"] and "provider" not in submitted["json"]
        polls = [r for r in fake.requests if r["method"] == "GET"]
        assert len(polls) >= 2 and all(r["authorized"] and r["path"].endswith(task["upstream_task_id"])
                                       for r in polls)
        logged = (await running.api.get(f"/v1/tasks/{task['id']}/callbacks")).json()["data"]
        # only the answers that changed the state are logged, marked as polled
        assert [c["body"]["state"] for c in logged] == ["running", "succeeded"]
        assert all(c["headers"]["x-receiver-source"] == "poll" and c["dialect"] == "xenodia" for c in logged)
        assert await running.ctx.store.next_job_due(["poll"]) is None


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("marker", "state", "code"),
    [
        pytest.param("[fail]", "failed", "generation_failed", id="failed"),
        pytest.param("[nested]", "succeeded", None, id="completed-with-result-data"),
        pytest.param("[flaky]", "succeeded", None, id="5xx-and-garbage-polls-are-retried"),
    ],
)
async def test_polled_outcomes(tmp_path: Path, logs, marker: str, state: str, code: str | None) -> None:
    fake = FakeProvider(delay=0.2)
    async with serve_in_background(fake.app) as url, start_receiver(tmp_path, provider_url=url, **FAST) as running:
        task = (await running.api.post("/v1/tasks", json={**BODY, "prompt": f"{marker} a lighthouse"})).json()
        done = await finished(running, task["id"])
        assert done["state"] == state
        assert (done["error"] or {}).get("code") == code
    if marker == "[flaky]":
        failures = logs.events("poll.failed")
        assert [f["code"] for f in failures] == ["upstream_error", "upstream_garbled"]
        assert failures[0]["status"] == 503


@pytest.mark.anyio
async def test_multipart_files_reach_xenodia_intact(tmp_path: Path) -> None:
    fake = FakeProvider(delay=0.2)
    first = PNG + os.urandom(2048)  # bytes after the magic are arbitrary: they must arrive as sent
    second = b"\xff\xd8\xff\xe0" + os.urandom(4096) + bytes(range(256))
    async with serve_in_background(fake.app) as url, start_receiver(tmp_path, provider_url=url, **FAST) as running:
        form = {"provider": "xenodia", "model": "nano-banana-pro", "prompt": "use these ☃ 雪", "resolution": "2K",
                "n": "1", "image_input": ["https://cdn.example/a.png", "https://cdn.example/b.png"]}
        files = [("image", ("first.png", first, "image/png")),
                 ("image[]", ("second.jpg", second, "application/octet-stream"))]
        headers = {"idempotency-key": "with-files"}
        answer = await running.api.post("/v1/tasks", data=form, files=files, headers=headers)
        assert answer.status_code == 202, answer.text
        task = answer.json()
        assert task["request"] == {"prompt": "use these ☃ 雪", "resolution": "2K", "n": 1,
                                   "image_input": ["https://cdn.example/a.png", "https://cdn.example/b.png"]}
        sent = fake.requests[0]
        assert sent["content_type"].startswith("multipart/form-data")
        assert sent["form"]["async"] == ["true"] and sent["form"]["response_format"] == ["url"]
        assert sent["form"]["image_input"] == ["https://cdn.example/a.png", "https://cdn.example/b.png"]
        assert sent["form"]["model"] == ["nano-banana-pro"] and sent["form"]["n"] == ["1"]
        received = [(f["field"], f["filename"], f["content_type"], f["data"]) for f in fake.files]
        assert received == [("image", "first.png", "image/png", first),
                            ("image[]", "second.jpg", "image/jpeg", second)]  # the type read from the bytes
        assert sent["files"][0]["sha256"] == hashlib.sha256(first).hexdigest()
        assert (await finished(running, task["id"]))["state"] == "succeeded"

        again = await running.api.post("/v1/tasks", data=form, files=files, headers=headers)
        assert again.status_code == 200 and again.json()["id"] == task["id"]
        other = [("image", ("first.png", first[:-1] + b"x", "image/png"))]
        conflict = await running.api.post("/v1/tasks", data=form, files=other, headers=headers)
        assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "idempotency_conflict"
        assert len([r for r in fake.requests if r["method"] == "POST"]) == 1


@pytest.mark.anyio
async def test_uploads_are_limited_while_reading(tmp_path: Path, fake_provider) -> None:
    fake, url = fake_provider
    async with start_receiver(tmp_path, provider_url=url, max_upload_bytes=4096) as running:
        form = {"provider": "xenodia", "model": "nano-banana-pro", "prompt": "p"}
        big = [("image", ("big.png", PNG + b"\x00" * 8192, "image/png"))]
        answer = await running.api.post("/v1/tasks", data=form, files=big)
        assert answer.status_code == 413 and answer.json()["error"]["code"] == "payload_too_large"

        boundary = "b0undary"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"provider\"\r\n\r\nxenodia\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
                "Content-Type: image/png\r\n\r\n").encode() + PNG

        async def chunks():  # no content-length: the limit applies while the body streams in
            yield head
            for _ in range(16):
                yield b"\x00" * 512

        streamed = await running.api.post(
            "/v1/tasks", content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "payload_too_large"
        broken = await running.api.post(
            "/v1/tasks", content=b"--nope\r\n", headers={"content-type": "multipart/form-data"})
        assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_request"
        # A text field that is not UTF-8 is refused, not read as Latin-1 and sent upstream garbled.
        latin = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"provider\"\r\n\r\nxenodia\r\n"
                 f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nnano-banana-pro\r\n"
                 f"--{boundary}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\n").encode()
        latin += b"\xff\xfe caf\xe9\r\n" + f"--{boundary}--\r\n".encode()
        garbled = await running.api.post(
            "/v1/tasks", content=latin, headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert garbled.status_code == 400 and garbled.json()["error"]["code"] == "invalid_request", garbled.text
        assert "'prompt'" in garbled.json()["error"]["message"]
    assert fake.requests == []


async def jobs(tmp_path: Path) -> list[dict[str, Any]]:
    def read() -> list[dict[str, Any]]:
        with sqlite3.connect(tmp_path / "receiver.db") as conn:
            conn.row_factory = sqlite3.Row
            rows = conn.execute("SELECT kind, task_id, run_at, attempts, payload FROM jobs").fetchall()
        return [{**dict(row), "payload": orjson.loads(row["payload"])} for row in rows]

    return await asyncio.to_thread(read)


@pytest.mark.anyio
async def test_polling_resumes_after_a_restart(tmp_path: Path, logs) -> None:
    fake = FakeProvider(delay=3.0)  # long enough to stop the receiver before the task finishes
    settings = {"poll_interval": 0.05, "poll_max_interval": 0.2}
    async with serve_in_background(fake.app) as url:
        async with start_receiver(tmp_path, provider_url=url, **settings) as running:
            task = (await running.api.post("/v1/tasks", json=BODY)).json()
            for _ in range(400):
                if len(logs.events("poll.answered")) >= 3:
                    break
                await asyncio.sleep(0.01)
        # Stopped mid-polling: the schedule is in the job row.
        [job] = await jobs(tmp_path)
        assert job["kind"] == "poll" and job["task_id"] == task["id"] and job["attempts"] >= 3
        assert job["payload"]["poll_url"] == f"/v1/tasks/{task['upstream_task_id']}"
        assert job["payload"]["delay"] > settings["poll_interval"]  # it had grown
        before = len(logs.events("poll.answered"))

        async with start_receiver(tmp_path, provider_url=url, **settings) as running:
            done = (await running.api.get(f"/v1/tasks/{task['id']}", params={"wait": 20})).json()
            assert done["state"] == "succeeded"
        attempts = [event["attempt"] for event in logs.events("poll.answered")]
        assert attempts == list(range(1, len(attempts) + 1))  # one schedule, carried across the restart
        assert len(attempts) > before and await jobs(tmp_path) == []
    assert len([r for r in fake.requests if r["method"] == "POST"]) == 1  # never submitted again


@pytest.mark.anyio
async def test_polling_stops_at_the_deadline(tmp_path: Path, logs) -> None:
    fake = FakeProvider(delay=0.05)
    async with serve_in_background(fake.app) as url, start_receiver(
        tmp_path, provider_url=url, task_timeout=0.6, **FAST
    ) as running:
        task = (await running.api.post("/v1/tasks", json={**BODY, "prompt": "[silent] forever waiting"})).json()
        for _ in range(200):
            if logs.events("poll.stopped"):
                break
            await asyncio.sleep(0.02)
        assert logs.events("poll.stopped")[0]["task_id"] == task["id"]
        polls = len([r for r in fake.requests if r["method"] == "GET"])
        running.ctx.store.feed.wake("expiry")
        done = (await running.api.get(f"/v1/tasks/{task['id']}", params={"wait": 10})).json()
        assert done["state"] == "expired" and done["error"]["code"] == "task_timeout"
        assert len([r for r in fake.requests if r["method"] == "GET"]) == polls
    assert await jobs(tmp_path) == []
