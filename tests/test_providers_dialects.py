"""kie, kling, apimart (and auto-detection across every dialect): parsing, then end to end
through the real callback endpoint with URLs minted by POST /v1/callback-urls."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from receiver.errors import InvalidPayload
from receiver.fakes.provider import CALLBACK_SHAPES
from receiver.providers import DIALECTS, detect, dialect_for
from receiver.providers.dialects import ApimartDialect, KieDialect, KlingDialect
from receiver.types import TaskState
from tests.conftest import Running

URL = "https://cdn.example/result.png"

KIE_SUCCESS = {
    "code": 200,
    "msg": "success",
    "data": {"taskId": "kie-1", "info": {"resultImageUrl": URL, "originImageUrl": "https://cdn.example/origin.png"}},
}
KIE_FAILURE = {"code": 501, "msg": "Generation failed: content policy", "data": {"taskId": "kie-1", "info": None}}
KLING_SUBMITTED = {"task_id": "kl-1", "task_status": "submitted", "task_status_msg": "", "created_at": 1722769557708,
                   "updated_at": 1722769557708}
KLING_PROCESSING = {**KLING_SUBMITTED, "task_status": "processing", "updated_at": 1722769560000}
KLING_IMAGES = [{"index": 1, "url": "https://cdn.example/b.png"}, {"index": 0, "url": URL}]
KLING_SUCCEED = {**KLING_SUBMITTED, "task_status": "succeed", "updated_at": 1722769580000,
                 "task_result": {"images": KLING_IMAGES}}
KLING_FAILED = {**KLING_SUBMITTED, "task_status": "failed", "task_status_msg": "Risk control: the prompt was refused"}
APIMART_PROGRESS = {"id": "am-1", "status": "processing", "progress": 40}
APIMART_COMPLETED = {"id": "am-1", "status": "completed", "progress": 100,
                     "result": {"images": [{"url": [URL, "https://cdn.example/c.png"], "expires_at": 1790000000}]}}
APIMART_FAILED = {"id": "am-1", "status": "failed", "progress": 100,
                  "error": {"code": "content_policy", "message": "refused"}}
XHUOAPI_SUCCESS = {"success": True, "task_id": "xh-1", "trace_id": "t",
                   "data": {"created": 1721626477, "data": [{"url": URL, "revised_prompt": "p"}]}}
XHUOAPI_FAILURE = {"success": False, "error": {"code": "api_error", "message": "fetch failed"}, "trace_id": "t"}


@pytest.mark.parametrize(
    ("payload", "dialect", "state", "upstream"),
    [
        pytest.param(KIE_SUCCESS, "kie", TaskState.SUCCEEDED, "kie-1", id="kie-success"),
        pytest.param(KIE_FAILURE, "kie", TaskState.FAILED, "kie-1", id="kie-failure"),
        pytest.param(KLING_SUBMITTED, "kling", TaskState.SUBMITTED, "kl-1", id="kling-submitted"),
        pytest.param(KLING_PROCESSING, "kling", TaskState.RUNNING, "kl-1", id="kling-processing"),
        pytest.param(KLING_SUCCEED, "kling", TaskState.SUCCEEDED, "kl-1", id="kling-succeed"),
        pytest.param(KLING_FAILED, "kling", TaskState.FAILED, "kl-1", id="kling-failed"),
        pytest.param(APIMART_PROGRESS, "apimart", TaskState.RUNNING, "am-1", id="apimart-progress"),
        pytest.param(APIMART_COMPLETED, "apimart", TaskState.SUCCEEDED, "am-1", id="apimart-completed"),
        pytest.param(APIMART_FAILED, "apimart", TaskState.FAILED, "am-1", id="apimart-failed"),
        pytest.param({"id": "am-1", "status": "cancelled"}, "apimart", TaskState.CANCELLED, "am-1",
                     id="apimart-cancelled"),
        pytest.param(XHUOAPI_SUCCESS, "xhuoapi", TaskState.SUCCEEDED, "xh-1", id="xhuoapi-success"),
        pytest.param(XHUOAPI_FAILURE, "xhuoapi", TaskState.FAILED, None, id="xhuoapi-failure"),
    ],
)
def test_auto_detects_each_seed_shape(payload: dict[str, Any], dialect: str, state: TaskState, upstream) -> None:
    assert [d.name for d in DIALECTS.values() if d.detect(payload)] == [dialect]  # exactly one claims it
    report = detect(payload).parse(payload)
    assert (report.dialect, report.state, report.upstream_task_id) == (dialect, state, upstream)
    assert dialect_for(dialect, payload).parse(payload) == report


def test_images_and_errors_are_normalised() -> None:
    assert KieDialect().parse(KIE_SUCCESS).images == (
        {"url": URL, "origin_url": "https://cdn.example/origin.png"},)
    assert KieDialect().parse(KIE_FAILURE).error == {
        "code": "generation_failed", "message": "Generation failed: content policy", "upstream_code": 501}
    assert KlingDialect().parse(KLING_SUCCEED).images == (
        {"url": URL, "index": 0}, {"url": "https://cdn.example/b.png", "index": 1})
    assert KlingDialect().parse(KLING_FAILED).error == {
        "code": "generation_failed", "message": "Risk control: the prompt was refused"}
    completed = ApimartDialect().parse(APIMART_COMPLETED)
    assert completed.images == ({"url": URL, "expires_at": 1790000000},
                                {"url": "https://cdn.example/c.png", "expires_at": 1790000000})
    assert ApimartDialect().parse(APIMART_FAILED).error == {"code": "content_policy", "message": "refused"}
    assert ApimartDialect().parse(APIMART_PROGRESS).progress == 40.0


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({"code": 200, "msg": "success", "data": {"taskId": "k", "info": {}}}, id="kie-no-image"),
        pytest.param({**KLING_SUCCEED, "task_result": {"images": []}}, id="kling-no-image"),
        pytest.param({"id": "a", "status": "completed", "result": {"images": []}}, id="apimart-no-image"),
        # An empty URL is no image either (a task must not succeed with nothing to show).
        pytest.param({"code": 200, "msg": "ok", "data": {"taskId": "k", "info": {"resultImageUrl": " "}}},
                     id="kie-empty-url"),
        pytest.param({**KLING_SUCCEED, "task_result": {"images": [{"index": 0, "url": ""}]}}, id="kling-empty-url"),
        pytest.param({"id": "a", "status": "completed", "result": {"images": [{"url": [""]}]}},
                     id="apimart-empty-url"),
        pytest.param({"success": True, "task_id": "x", "data": {"data": [{"url": "", "revised_prompt": "p"}]}},
                     id="xhuoapi-empty-url"),
        pytest.param({"success": True, "task_id": "x", "data": {"data": [{"b64_json": ""}]}},
                     id="xhuoapi-empty-inline-image"),
        pytest.param({"id": "p1", "status": "succeeded", "output": [""], "input": {"prompt": "p"}},
                     id="replicate-empty-url-in-list"),
        pytest.param({"id": "p1", "status": "succeeded", "output": "", "input": {"prompt": "p"}},
                     id="replicate-empty-url"),
    ],
)
def test_success_without_images_fails(payload) -> None:
    report = detect(payload).parse(payload)
    assert report.state is TaskState.FAILED and report.error is not None and report.error["code"] == "empty_result"


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({"hello": "world"}, id="unknown"),
        pytest.param({}, id="empty"),
        pytest.param({"id": "x"}, id="an-id-alone"),
        pytest.param({**KIE_SUCCESS, "success": True}, id="kie-and-xhuoapi"),
        pytest.param({**KLING_PROCESSING, "id": "x", "progress": 10}, id="kling-and-apimart"),
    ],
)
def test_unknown_or_ambiguous_payloads_are_refused(payload) -> None:
    with pytest.raises(InvalidPayload) as caught:
        detect(payload)
    assert caught.value.status_code == 400 and caught.value.code == "invalid_payload"


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({"id": "p1", "status": "succeeded", "output": [URL], "input": {"prompt": "p"}}, id="succeeded"),
        pytest.param({"id": "p1", "status": "failed", "version": "v1", "error": "nsfw"}, id="failed-with-version"),
    ],
)
def test_a_prediction_is_replicate_not_apimart(payload) -> None:
    assert [d.name for d in DIALECTS.values() if d.detect(payload)] == ["replicate"]


@pytest.mark.parametrize(
    ("dialect", "payload"),
    [
        pytest.param(KieDialect(), {"code": "200", "msg": "x", "data": {"taskId": "k"}}, id="kie-code-not-int"),
        pytest.param(KieDialect(), {"code": 200, "msg": "x", "data": [1]}, id="kie-data-not-object"),
        pytest.param(KlingDialect(), {**KLING_SUBMITTED, "task_status": "dreaming"}, id="kling-unknown-status"),
        pytest.param(KlingDialect(), {**KLING_SUCCEED, "task_result": {"images": [{"index": 0}]}},
                     id="kling-image-without-url"),
        pytest.param(ApimartDialect(), {"id": "a", "status": "completed", "result": {"images": [{"url": 5}]}},
                     id="apimart-url-not-list"),
        pytest.param(ApimartDialect(), {"id": "a", "status": 3}, id="apimart-status-not-string"),
    ],
)
def test_malformed_payloads_are_invalid(dialect, payload) -> None:
    with pytest.raises(InvalidPayload):
        dialect.parse(payload)


# --- end to end: callback URLs minted for tasks submitted elsewhere ------------------------


async def mint(running: Running, provider: str) -> tuple[dict[str, Any], str]:
    minted = await running.api.post("/v1/callback-urls", json={"provider": provider})
    assert minted.status_code == 201, minted.text
    return minted.json()["task"], minted.json()["callback_url"]


async def show(running: Running, task_id: str) -> dict[str, Any]:
    return (await running.api.get(f"/v1/tasks/{task_id}")).json()


def with_id(payload: dict[str, Any], key: str, value: str) -> dict[str, Any]:
    if key == "taskId":
        return {**payload, "data": {**payload["data"], "taskId": value}}
    return {**payload, key: value}


CASES = {
    # provider: (id key, progress payloads, success, failure, a late progress, suffix)
    "kie": ("taskId", [], KIE_SUCCESS, KIE_FAILURE, None, ""),
    "kling": ("task_id", [KLING_SUBMITTED, KLING_PROCESSING], KLING_SUCCEED, KLING_FAILED,
              {**KLING_PROCESSING, "updated_at": 1722769590000}, ""),
    "apimart": ("id", [APIMART_PROGRESS], APIMART_COMPLETED, APIMART_FAILED, {**APIMART_PROGRESS, "progress": 90},
                "/callback"),
    "xhuoapi": ("task_id", [], XHUOAPI_SUCCESS, {**XHUOAPI_FAILURE, "task_id": "x"}, None, ""),
}


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["named", "auto"])
@pytest.mark.parametrize("provider", sorted(CASES))
async def test_each_dialect_end_to_end(running: Running, provider: str, how: str) -> None:
    key, progress, success, failure, stale, suffix = CASES[provider]
    upstream = f"{provider}-{how}-1"
    task, url = await mint(running, provider if how == "named" else "auto")
    url += suffix
    for payload in progress:
        answer = await running.post_callback(url, with_id(payload, key, upstream))
        assert answer.status_code == 200 and "ignored" not in answer.json(), answer.text
    if progress:
        shown = await show(running, task["id"])
        expected = "running" if any(p.get("task_status", p.get("status")) != "submitted" for p in progress) else (
            "submitted")
        assert shown["state"] == expected and shown["upstream_task_id"] == upstream
        assert shown["provider"] == provider  # auto learned the dialect from the first callback
    done = await running.post_callback(url, with_id(success, key, upstream))
    assert done.status_code == 200 and done.json()["duplicate"] is False
    shown = await show(running, task["id"])
    assert shown["state"] == "succeeded" and shown["provider"] == provider
    assert shown["result"]["images"][0]["url"] == URL and shown["upstream_task_id"] == upstream
    if stale:  # late progress after the result is logged and ignored
        late = await running.post_callback(url, with_id(stale, key, upstream))
        assert late.status_code == 200 and late.json()["ignored"] is True and late.json()["reason"] == "late"
        assert (await show(running, task["id"]))["state"] == "succeeded"

    failing, failing_url = await mint(running, provider if how == "named" else "auto")
    answer = await running.post_callback(failing_url + suffix, with_id(failure, key, f"{upstream}-f"))
    assert answer.status_code == 200
    failed = await show(running, failing["id"])
    assert failed["state"] == "failed" and failed["error"]["code"] and failed["error"]["message"]

    logged = (await running.api.get(f"/v1/tasks/{task['id']}/callbacks")).json()["data"]
    assert [c["dialect"] for c in logged] == [provider] * len(logged)
    assert [c["verdict"] for c in logged] == ["accepted"] * (len(progress) + 1) + (["ignored"] if progress else [])


@pytest.mark.anyio
async def test_a_dialect_refuses_another_dialects_payload(running: Running) -> None:
    task, url = await mint(running, "kling")
    answer = await running.post_callback(url, APIMART_COMPLETED)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_payload"
    ambiguous = await running.post_callback((await mint(running, "auto"))[1], {**KIE_SUCCESS, "success": True})
    assert ambiguous.status_code == 400 and ambiguous.json()["error"]["code"] == "invalid_payload"
    assert (await show(running, task["id"]))["state"] == "submitted"


@pytest.mark.anyio
async def test_apimart_can_cancel_its_task(running: Running) -> None:
    task, url = await mint(running, "apimart")
    assert (await running.post_callback(url + "/callback", APIMART_PROGRESS)).status_code == 200
    answer = await running.post_callback(url + "/callback", {"id": "am-1", "status": "cancelled"})
    assert answer.status_code == 200 and "ignored" not in answer.json()
    shown = await show(running, task["id"])
    assert shown["state"] == "cancelled" and shown["error"]["code"] == "upstream_cancelled"


@pytest.mark.anyio
async def test_an_auto_task_reads_later_callbacks_in_the_dialect_it_learned(running: Running) -> None:
    task, url = await mint(running, "auto")
    first = await running.post_callback(url, with_id(KLING_PROCESSING, "task_id", "kl-auto"))
    assert first.status_code == 200 and (await show(running, task["id"]))["provider"] == "kling"
    # Detection alone could not tell this one (kling and apimart fields), but the task is kling now.
    ambiguous = {**with_id(KLING_SUCCEED, "task_id", "kl-auto"), "id": "kl-auto", "progress": 100}
    with pytest.raises(InvalidPayload):
        detect(ambiguous)
    done = await running.post_callback(url, ambiguous)
    assert done.status_code == 200 and "ignored" not in done.json(), done.text
    shown = await show(running, task["id"])
    assert shown["state"] == "succeeded" and shown["result"]["images"][0]["url"] == URL
    other = await running.post_callback(url, {**APIMART_COMPLETED, "id": "kl-auto"})  # another dialect: refused
    assert other.status_code == 400 and "kling" in other.json()["error"]["message"]


@pytest.mark.anyio
@pytest.mark.parametrize("dialect", ["kie", "kling", "apimart", "xhuoapi"])
async def test_the_fake_provider_posts_each_dialect(running: Running, fake_provider, dialect: str) -> None:
    fake, fake_url = fake_provider
    task, url = await mint(running, "auto")
    async with httpx.AsyncClient() as client:
        started = await client.post(f"{fake_url}/_fake/callbacks/{dialect}",
                                    json={"callback_url": url, "duplicate": True, "out_of_order": True})
    assert started.status_code == 200, started.text
    done = (await running.api.get(f"/v1/tasks/{task['id']}", params={"wait": 10})).json()
    assert done["state"] == "succeeded" and done["provider"] == dialect
    assert done["result"]["images"][0]["url"].startswith(fake_url + "/images/")
    expected = started.json()["callbacks"]
    for _ in range(100):  # the duplicate and the late progress arrive just after the result
        logged = (await running.api.get(f"/v1/tasks/{task['id']}/callbacks")).json()["data"]
        if len(logged) == expected:
            break
        await asyncio.sleep(0.02)
    verdicts = [c["verdict"] for c in logged]
    assert verdicts.count("duplicate") == 1
    assert verdicts.count("ignored") == (1 if dialect in ("kling", "apimart") else 0)
    assert all(c["status"] == 200 for c in fake.callbacks_sent)


@pytest.mark.anyio
async def test_the_fake_provider_fails_on_request(running: Running, fake_provider) -> None:
    _, fake_url = fake_provider
    task, url = await mint(running, "kling")
    async with httpx.AsyncClient() as client:
        await client.post(f"{fake_url}/_fake/callbacks/kling", json={"callback_url": url, "fail": True})
    done = (await running.api.get(f"/v1/tasks/{task['id']}", params={"wait": 10})).json()
    assert done["state"] == "failed" and "simulated" in done["error"]["message"]


def test_fake_provider_shapes_are_what_the_dialects_read() -> None:
    for name, shape in CALLBACK_SHAPES.items():
        for failed in (False, True):
            progress, result, late = shape("t-1", "http://fake", failed)
            assert detect(result).name == name
            assert detect(result).parse(result).state is (TaskState.FAILED if failed else TaskState.SUCCEEDED)
            for p in [*progress, *([late] if late else [])]:
                assert detect(p).parse(p).state in (TaskState.SUBMITTED, TaskState.RUNNING)
            assert late is None or late not in progress  # a retry that changed, so not a duplicate
