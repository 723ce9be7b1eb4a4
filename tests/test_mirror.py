"""Keeping images before their links expire: downloads, limits, retries, and the held-back event."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from receiver.clock import FakeClock
from receiver.fakes.provider import PNG, FakeProvider
from receiver.fakes.subscriber import FakeSubscriber
from receiver.server import free_port, serve_in_background
from tests.conftest import Running, start_receiver
from tests.delivery.helpers import eventually, sink, subscribe
from tests.routes.test_streams import frames

pytestmark = pytest.mark.anyio

SUBMISSION = {"provider": "xhuoapi", "model": "nano-banana", "prompt": "a pear"}


@asynccontextmanager
async def mirroring(
    tmp_path: Path, fake_provider: tuple[FakeProvider, str], *, database_url: str | None = None, **overrides: Any
) -> AsyncIterator[Running]:
    if database_url is not None:
        overrides["database_url"] = database_url
    overrides.setdefault("mirror_assets", True)
    async with start_receiver(tmp_path, provider_url=fake_provider[1], **overrides) as running:
        yield running


async def succeeded_events(subscriber: FakeSubscriber, task_id: str) -> list[dict[str, Any]]:
    return [r.event for r in subscriber.verified if r.type == "task.succeeded" and r.task_id == task_id]


async def announced(subscriber: FakeSubscriber, task_id: str) -> dict[str, Any]:
    """The task as its one task.succeeded event carries it (after a moment in which a second could come)."""
    await subscriber.wait_for(lambda got: any(r.type == "task.succeeded" and r.task_id == task_id for r in got))
    await asyncio.sleep(0.2)
    [event] = await succeeded_events(subscriber, task_id)
    data: dict[str, Any] = event["data"]
    return data


async def post_images(running: Running, fake_url: str, *queries: str) -> str:
    """A task minted for xhuoapi callbacks, succeeded with one fake image per query string; its id."""
    minted = (await running.api.post("/v1/callback-urls", json={"provider": "xhuoapi"})).json()
    images = [{"url": q if "://" in q else f"{fake_url}/images/{i}.png?{q}"} for i, q in enumerate(queries)]
    body = {"success": True, "task_id": "up-" + minted["task"]["id"], "data": {"data": images}}
    answer = await running.post_callback(minted["callback_url"], body)
    assert answer.status_code == 200, answer.text
    task_id: str = minted["task"]["id"]
    return task_id


async def settled(running: Running, task_id: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        task: dict[str, Any] = (await running.api.get(f"/v1/tasks/{task_id}")).json()
        return task if task["result"]["mirror"] != "pending" else None

    return await eventually(check)


@pytest.mark.parametrize("database", ["sqlite", "postgres"], indirect=True)
async def test_the_success_is_announced_once_with_its_images_kept(
    tmp_path: Path, fake_provider: tuple[FakeProvider, str], database_url: str
) -> None:
    async with sink() as (subscriber, hook), mirroring(tmp_path, fake_provider, database_url=database_url) as running:
        await subscribe(running, hook)
        submitted = await running.api.post("/v1/tasks", json=SUBMISSION)
        assert submitted.status_code == 202, submitted.text
        task_id = submitted.json()["id"]
        task = await announced(subscriber, task_id)
        assert [r.type for r in subscriber.verified if r.task_id == task_id] == ["task.submitted", "task.succeeded"]
        [image] = task["result"]["images"]
        assert task["state"] == "succeeded" and task["result"]["mirror"] == "done" and task["sequence"] == 3
        assert image["url"].startswith(fake_provider[1]) and "asset_error" not in image
        assert image["asset_url"].startswith(f"{running.url}/assets/")
        assert (await running.api.get(f"/v1/tasks/{task_id}")).json() == task  # what is stored is what was sent
        async with httpx.AsyncClient() as anonymous:  # the asset URL alone is the authorisation
            kept = await anonymous.get(image["asset_url"])
        assert kept.status_code == 200 and kept.content == PNG
        assert kept.headers["content-type"] == "image/png"
        assert "immutable" in kept.headers["cache-control"]
        assert len(list((tmp_path / "assets").iterdir())) == 1  # the bytes are a file, never a database row


@pytest.mark.parametrize(
    ("query", "code"),
    [
        pytest.param("size=5000", "asset_too_large", id="too-large"),
        pytest.param("type=text/html", "not_an_image", id="declared-html"),
        pytest.param("bytes=text", "not_an_image", id="png-that-is-html"),
        pytest.param("type=image/svg%2Bxml&bytes=text", "not_an_image", id="svg"),
        pytest.param("status=404", "download_failed", id="not-found"),
    ],
)
async def test_images_that_cannot_be_kept_say_why_and_the_event_still_goes(
    tmp_path: Path, fake_provider: tuple[FakeProvider, str], query: str, code: str, logs
) -> None:
    async with sink() as (subscriber, hook), mirroring(tmp_path, fake_provider, mirror_max_bytes=1000) as running:
        await subscribe(running, hook)
        task_id = await post_images(running, fake_provider[1], "", query)
        task = await announced(subscriber, task_id)
    kept, refused = task["result"]["images"]
    assert task["result"]["mirror"] == "failed"
    assert kept["asset_url"].startswith(f"{running.url}/assets/") and "asset_error" not in kept
    assert refused["asset_url"] is None and refused["asset_error"]["code"] == code
    assert any(w.startswith(f"image 1 was not kept ({code})") for w in task["warnings"])
    assert not logs.events("mirror.retry")  # none of these is worth trying again


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("http://127.0.0.1:{port}/images/a.png", id="loopback"),
        pytest.param("http://169.254.169.254/latest/meta-data", id="metadata"),
        pytest.param("http://localhost:{port}/images/a.png", id="localhost"),
        pytest.param("file:///etc/passwd", id="file"),
    ],
)
async def test_guarded_urls_are_never_fetched(
    tmp_path: Path, fake_provider: tuple[FakeProvider, str], url: str
) -> None:
    port = fake_provider[1].rsplit(":", 1)[1]
    async with mirroring(tmp_path, fake_provider, allow_private_urls=False) as running:
        task_id = await post_images(running, fake_provider[1], url.format(port=port))
        task = await settled(running, task_id)
    [image] = task["result"]["images"]
    assert image["asset_error"]["code"] == "url_not_allowed" and image["asset_url"] is None
    assert not (tmp_path / "assets").exists()


async def test_unreachable_images_are_tried_a_few_times_then_given_up(
    tmp_path: Path, fake_provider: tuple[FakeProvider, str], logs
) -> None:
    clock = FakeClock(time.time())  # near the real time: the subscriber checks the signatures' timestamps
    dead = f"http://127.0.0.1:{free_port()}/gone.png"
    async with sink() as (subscriber, hook), mirroring(tmp_path, fake_provider, clock=clock) as running:
        await subscribe(running, hook)
        task_id = await post_images(running, fake_provider[1], dead)
        feed = running.ctx.store.feed
        while not await succeeded_events(subscriber, task_id):
            # The retries wait on the injected clock: move it past each delay and wake the job runner.
            await asyncio.sleep(0.05)
            clock.advance(31)  # the longest retry delay, and little more
            feed.wake("jobs")
        task = await announced(subscriber, task_id)
    assert len(logs.events("mirror.retry")) == 3  # four attempts in all
    [image] = task["result"]["images"]
    assert image["asset_error"]["code"] == "download_failed" and task["result"]["mirror"] == "failed"


async def test_a_disk_that_cannot_take_the_image_is_tried_again_then_given_up(
    tmp_path: Path, fake_provider: tuple[FakeProvider, str], logs, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock(time.time())
    async with sink() as (subscriber, hook), mirroring(tmp_path, fake_provider, clock=clock) as running:

        async def full(data: bytes) -> str:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(running.ctx.assets, "put", full)
        await subscribe(running, hook)
        task_id = await post_images(running, fake_provider[1], "")
        while not await succeeded_events(subscriber, task_id):
            await asyncio.sleep(0.05)
            clock.advance(31)
            running.ctx.store.feed.wake("jobs")
        task = await announced(subscriber, task_id)
    assert len(logs.events("mirror.retry")) == 3 and len(logs.events("mirror.store_failed")) == 4
    [image] = task["result"]["images"]
    assert image["asset_error"]["code"] == "asset_store_failed" and task["result"]["mirror"] == "failed"


async def test_a_retried_image_that_comes_back_is_kept(tmp_path: Path, fake_provider: tuple[FakeProvider, str]) -> None:
    clock = FakeClock()
    async with mirroring(tmp_path, fake_provider, clock=clock) as running:
        task_id = await post_images(running, fake_provider[1], "status=503")
        await eventually(lambda: _rescheduled(running))
        # The provider's CDN recovers: the image is now where the task's URL points.
        task = await running.ctx.store.get_task(task_id)
        assert task is not None and task.mirroring
        images = [{"url": f"{fake_provider[1]}/images/0.png"}]
        await _point_at(running, task_id, images)
        clock.advance(60)
        running.ctx.store.feed.wake("jobs")
        done = await settled(running, task_id)
    assert done["result"]["mirror"] == "done" and done["result"]["images"][0]["asset_url"]


async def _rescheduled(running: Running) -> bool:
    jobs = (await running.ctx.store.counts())["jobs"]
    due = await running.ctx.store.next_job_due(["mirror"])
    return bool(jobs.get("mirror")) and due is not None and due > running.ctx.clock()


async def _point_at(running: Running, task_id: str, images: list[dict[str, Any]]) -> None:
    from functools import partial

    await running.ctx.store.transition(task_id, partial(_with_images, images=images))


def _with_images(task, *, images):  # module-level: decisions travel to the SQLite writer
    from receiver.tasks import Transition

    return Transition(task.replace(result={**task.result, "images": images}))


async def test_sse_and_long_poll_show_the_success_at_once_and_sse_the_kept_images_after(
    tmp_path: Path, fake_provider: tuple[FakeProvider, str]
) -> None:
    async with mirroring(tmp_path, fake_provider) as running:
        minted = (await running.api.post("/v1/callback-urls", json={"provider": "xhuoapi"})).json()
        task_id = minted["task"]["id"]
        async with running.api.stream("GET", f"/v1/tasks/{task_id}/events") as response:
            seen = []
            async for frame in frames(response):
                if "event" not in frame:
                    continue
                seen.append((frame["id"], frame["event"], orjson.loads(frame["data"])))
                if len(seen) == 1:  # slow image: mirroring takes a moment
                    image = {"url": f"{fake_provider[1]}/images/0.png?delay=0.5"}
                    body = {"success": True, "task_id": "up-1", "data": {"data": [image]}}
                    await running.post_callback(minted["callback_url"], body)
                    polled = (await running.api.get(f"/v1/tasks/{task_id}", params={"wait": 5})).json()
                    assert polled["state"] == "succeeded" and polled["result"]["mirror"] == "pending"
                    assert polled["result"]["images"][0]["asset_url"] is None
    assert [(i, e) for i, e, _ in seen] == [("1", "task.submitted"), ("2", "task.succeeded"), ("2", "task.succeeded")]
    assert seen[1][2]["result"]["mirror"] == "pending" and seen[2][2]["result"]["mirror"] == "done"
    assert seen[2][2]["result"]["images"][0]["asset_url"].startswith(f"{running.url}/assets/")


async def test_with_mirroring_off_the_success_is_announced_at_once(
    tmp_path: Path, fake_provider: tuple[FakeProvider, str]
) -> None:
    async with sink() as (subscriber, hook), mirroring(tmp_path, fake_provider, mirror_assets=False) as running:
        await subscribe(running, hook)
        task_id = await post_images(running, fake_provider[1], "")
        task = await announced(subscriber, task_id)
        assert (await running.ctx.store.counts())["jobs"] == {}
    assert "mirror" not in task["result"] and task["result"]["images"][0]["asset_url"] is None
    assert not (tmp_path / "assets").exists()


@asynccontextmanager
async def redirects(image_url: str) -> AsyncIterator[str]:
    """`/hops/N` redirects N + 1 times, the last to `image_url`; `/elsewhere` redirects to a file: URL."""

    async def hops(request: Any) -> RedirectResponse:
        left = int(request.path_params["left"])
        return RedirectResponse(image_url if left == 0 else f"/hops/{left - 1}", status_code=302)

    async def elsewhere(request: Any) -> Response:
        return Response(status_code=307, headers={"location": "file:///etc/passwd"})

    app = Starlette(routes=[Route("/hops/{left}", hops), Route("/elsewhere", elsewhere)])
    async with serve_in_background(app) as url:
        yield url


async def test_redirects_are_followed_a_few_hops_and_never_off_http(
    tmp_path: Path, fake_provider: tuple[FakeProvider, str]
) -> None:
    async with redirects(f"{fake_provider[1]}/images/x.png") as url, mirroring(tmp_path, fake_provider) as running:
        task_id = await post_images(running, fake_provider[1], f"{url}/hops/2", f"{url}/hops/3", f"{url}/elsewhere")
        task = await settled(running, task_id)
    three, four, elsewhere = task["result"]["images"]
    assert three["asset_url"] and "asset_error" not in three, three
    assert four["asset_error"]["code"] == "download_failed" and "redirects" in four["asset_error"]["message"]
    assert elsewhere["asset_error"]["code"] == "url_not_allowed"


async def test_one_result_is_bounded_in_images_and_in_downloads_at_once(
    tmp_path: Path, fake_provider: tuple[FakeProvider, str]
) -> None:
    """A callback URL cannot make the receiver fetch and keep thousands of images, nor take every
    download slot (the success of every other task waits for its own images)."""
    from receiver.ingest import MAX_IMAGES
    from receiver.mirror import DOWNLOADS_PER_TASK

    in_flight = peak = 0

    async def image(request: Any) -> Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await asyncio.sleep(0.05)
            return Response(PNG + request.path_params["n"].encode(), media_type="image/png")
        finally:
            in_flight -= 1

    cdn = Starlette(routes=[Route("/{n}.png", image)])
    async with serve_in_background(cdn) as cdn_url, mirroring(tmp_path, fake_provider) as running:
        too_many = [f"{cdn_url}/{i}.png" for i in range(MAX_IMAGES + 1)]
        minted = (await running.api.post("/v1/callback-urls", json={"provider": "xhuoapi"})).json()
        body = {"success": True, "task_id": "up-many", "data": {"data": [{"url": url} for url in too_many]}}
        refused = await running.post_callback(minted["callback_url"], body)
        assert refused.status_code == 400 and refused.json()["error"]["details"] == {"limit": MAX_IMAGES}

        task_id = await post_images(running, fake_provider[1], *too_many[:MAX_IMAGES])
        done = await settled(running, task_id)
    assert done["result"]["mirror"] == "done" and all(i["asset_url"] for i in done["result"]["images"])
    assert peak == DOWNLOADS_PER_TASK
