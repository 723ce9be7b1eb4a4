"""The router: a synchronous provider called from a background job, at most once."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.datastructures import Secret

from receiver.app import create_app
from receiver.config import ProviderSettings
from receiver.errors import InvalidPayload, ProviderError
from receiver.fakes.provider import PNG
from receiver.ids import new_id
from receiver.providers.router import RouterProvider
from receiver.server import serve_in_background
from receiver.store.sqlite import SQLiteStore
from receiver.tasks import JobSpec, Task
from receiver.types import TaskState
from tests.conftest import API_KEY, Running, make_settings, needs_postgres, start_receiver

pytestmark = pytest.mark.anyio

BODY = {"provider": "router", "model": "openai/gpt-image-1", "prompt": "a lighthouse", "size": "1024x1024"}


async def finished(running: Running, task_id: str) -> dict[str, Any]:
    return (await running.api.get(f"/v1/tasks/{task_id}", params={"wait": 20})).json()


@pytest.mark.parametrize("database", ["sqlite", pytest.param("postgres", marks=needs_postgres)], indirect=True)
async def test_the_call_is_made_in_the_background(running: Running, fake_provider) -> None:
    fake, url = fake_provider
    fake.delay = 0.3  # the router takes its time; the client does not wait for it
    answer = await running.api.post("/v1/tasks", json={**BODY, "n": 2, "metadata": {"order": 3}})
    assert answer.status_code == 202, answer.text
    task = answer.json()
    assert task["state"] == "submitted" and task["sequence"] == 1 and task["upstream_task_id"] is None
    done = await finished(running, task["id"])
    assert done["state"] == "succeeded" and done["sequence"] == 2
    assert [i["url"].startswith(f"{url}/images/") for i in done["result"]["images"]] == [True, True]
    [call] = fake.requests
    assert call["path"] == "/v1/images/generations" and call["authorized"]
    assert call["json"] == {"model": "openai/gpt-image-1", "prompt": "a lighthouse", "size": "1024x1024", "n": 2}
    [logged] = (await running.api.get(f"/v1/tasks/{task['id']}/callbacks")).json()["data"]
    assert logged["headers"]["x-receiver-source"] == "sync-response" and logged["dialect"] == "router"
    assert logged["verdict"] == "accepted" and logged["body"]["usage"] == {"images": 2, "cost": 0}


async def test_inline_images_become_assets_never_bytes_in_the_database(
    tmp_path: Path, running: Running, fake_provider
) -> None:
    task = (await running.api.post("/v1/tasks", json={**BODY, "prompt": "[b64] a lighthouse"})).json()
    done = await finished(running, task["id"])
    assert done["state"] == "succeeded"
    [image] = done["result"]["images"]
    assert image["url"] == image["asset_url"] and image["url"].startswith(f"{running.url}/assets/")
    assert "b64_json" not in image
    async with httpx.AsyncClient() as anonymous:
        served = await anonymous.get(image["url"])
    assert served.status_code == 200 and served.content == PNG and served.headers["content-type"] == "image/png"
    assert (tmp_path / "assets" / f"{hashlib.sha256(PNG).hexdigest()}.png").read_bytes() == PNG
    [logged] = (await running.api.get(f"/v1/tasks/{task['id']}/callbacks")).json()["data"]
    assert logged["body"]["data"][0]["b64_json"].endswith("stored as an asset]")
    encoded = base64.b64encode(PNG)
    for name in ("receiver.db", "receiver.db-wal"):
        path = tmp_path / name
        assert not path.exists() or encoded not in path.read_bytes()


@pytest.mark.parametrize(
    ("prompt", "code", "status"),
    [
        pytest.param("[fail] x", "upstream_error", 502, id="502"),
        pytest.param("[refuse:402] x", "upstream_billing", 402, id="402"),
        pytest.param("[refuse:429] x", "upstream_rate_limited", 429, id="429"),
    ],
)
async def test_errors_fail_the_task_like_a_refusal(running: Running, prompt: str, code: str, status: int) -> None:
    task = (await running.api.post("/v1/tasks", json={**BODY, "prompt": prompt})).json()
    done = await finished(running, task["id"])
    assert done["state"] == "failed" and done["error"]["code"] == code and done["error"]["status_code"] == status
    assert done["error"]["body"]["error"]["message"]


async def test_idempotent_retries_call_once(running: Running, fake_provider) -> None:
    fake, _ = fake_provider
    headers = {"idempotency-key": "router-1"}
    answers = await asyncio.gather(*(running.api.post("/v1/tasks", json=BODY, headers=headers) for _ in range(3)))
    assert sorted(a.status_code for a in answers) == [200, 200, 202]
    assert len({a.json()["id"] for a in answers}) == 1
    await finished(running, answers[0].json()["id"])
    assert len(fake.requests) == 1


# --- at most once: interrupted calls fail, they are never repeated ---------------------------


@asynccontextmanager
async def receiver_with(tmp_path: Path, handler: Callable[[httpx.Request], Awaitable[httpx.Response]]
                        ) -> AsyncIterator[httpx.AsyncClient]:
    providers = {"router": ProviderSettings(url="https://router.test", api_key=Secret("rk"))}
    settings = make_settings(tmp_path, providers=providers)
    app = create_app(settings, transport=httpx.MockTransport(handler))
    async with serve_in_background(app) as url, httpx.AsyncClient(
        base_url=url, headers={"authorization": f"Bearer {API_KEY}"}, timeout=20
    ) as api:
        yield api


async def test_a_call_cut_by_a_crash_fails_instead_of_repeating(tmp_path: Path) -> None:
    # What a crash mid-call leaves behind: the task, and its job marked `calling`, now past its time.
    store = SQLiteStore(tmp_path / "receiver.db")
    await store.open()
    now = time.time()
    task = Task(id=new_id("tsk"), provider="router", model="m", state=TaskState.SUBMITTED,
                request={"prompt": "p"}, created_at=now, updated_at=now, expires_at=now + 3600)
    await store.create_task(task, jobs=[JobSpec("router", now - 1, {"phase": "calling", "started_at": now - 700})])
    await store.close()

    calls: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(200, json={"created": 1, "data": [{"url": "https://cdn.example/a.png"}]})

    async with receiver_with(tmp_path, handler) as api:
        done = (await api.get(f"/v1/tasks/{task.id}", params={"wait": 10})).json()
    assert done["state"] == "failed" and done["error"]["code"] == "call_interrupted"
    assert "not repeated" in done["error"]["message"]
    assert calls == []


async def test_a_graceful_shutdown_during_a_call_fails_it(tmp_path: Path) -> None:
    entered = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        entered.set()
        await asyncio.Event().wait()  # the router never answers before the shutdown
        raise AssertionError("unreachable")

    async with receiver_with(tmp_path, handler) as api:
        task = (await api.post("/v1/tasks", json=BODY)).json()
        await asyncio.wait_for(entered.wait(), 10)
    store = SQLiteStore(tmp_path / "receiver.db")
    await store.open()
    try:
        stored = await store.get_task(task["id"])
        assert stored is not None and stored.state is TaskState.FAILED
        assert stored.error is not None and stored.error["code"] == "call_interrupted"
        assert await store.next_job_due(["router"]) is None
    finally:
        await store.close()


async def test_a_call_is_bounded_by_the_router_timeout(tmp_path: Path, fake_provider) -> None:
    fake, url = fake_provider
    fake.delay = 5.0
    async with start_receiver(tmp_path, provider_url=url, router_timeout=0.3) as running:
        task = (await running.api.post("/v1/tasks", json=BODY)).json()
        done = await finished(running, task["id"])
    assert done["state"] == "failed" and done["error"]["code"] == "upstream_timeout"


# --- the provider on its own ---------------------------------------------------------------


async def test_reading_answers() -> None:
    async with httpx.AsyncClient() as client:
        router = RouterProvider(ProviderSettings(url="https://router.test"), client)
    report = router.read({"created": 1, "data": [{"url": "https://a/1.png"}, {"b64_json": "AAAA"}],
                          "usage": {}})
    assert report.state is TaskState.SUCCEEDED and report.images == ({"url": "https://a/1.png"},
                                                                       {"b64_json": "AAAA"})
    assert router.read({"created": 1, "data": []}).state is TaskState.FAILED
    assert router.read({"id": "gen-7", "data": [{"url": "https://a/1.png"}]}).upstream_task_id == "gen-7"
    for bad in ({"created": 1}, {"data": [{"nope": 1}]}):
        with pytest.raises(InvalidPayload):
            router.read(bad)


async def test_references_are_sent_as_the_routers_image_url_objects() -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(orjson.loads(request.content))
        return httpx.Response(200, json={"created": 1, "data": [{"url": "https://a/1.png"}]})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        router = RouterProvider(ProviderSettings(url="https://router.test"), client)
        urls = ["https://cdn.example/ref.png", "data:image/png;base64,AAAA"]
        task = Task(id="tsk_1", provider="router", model="m", state=TaskState.SUBMITTED,
                    request={"prompt": "p", "input_references": urls}, created_at=0, updated_at=0, expires_at=1)
        await router.generate(task, timeout=5)
    assert seen[0]["input_references"] == [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    assert task.request["input_references"] == urls  # the task keeps what the client sent


async def test_provider_options_are_sent_as_provider() -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(orjson.loads(request.content))
        return httpx.Response(200, json={"error": {"code": "no_capacity", "message": "busy"}})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        router = RouterProvider(ProviderSettings(url="https://router.test"), client)
        task = Task(id="tsk_1", provider="router", model="m", state=TaskState.SUBMITTED,
                    request={"prompt": "p", "provider_options": {"order": ["a"]}}, created_at=0, updated_at=0,
                    expires_at=1)
        with pytest.raises(ProviderError) as caught:
            await router.generate(task, timeout=5)
    assert seen == [{"model": "m", "prompt": "p", "provider": {"order": ["a"]}}]
    assert caught.value.code == "no_capacity"  # a 200 that says no is a refusal
