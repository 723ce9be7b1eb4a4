from __future__ import annotations

import httpx
import orjson
import pytest
from starlette.datastructures import Secret

from receiver.config import ProviderSettings
from receiver.errors import InvalidPayload, ProviderError
from receiver.providers import detect, dialect_for
from receiver.providers.xhuoapi import XhuoapiDialect, XhuoapiProvider
from receiver.tasks import Task
from receiver.types import TaskState

SUCCESS = {
    "success": True,
    "task_id": "6a97bf49-df50-4129-9e46-119aa9fca73c",
    "trace_id": "9b4b1ff3-90f2-470f-b082-1061ec2948cc",
    "data": {
        "created": 1721626477,
        "data": [{"revised_prompt": "A delightful image…", "url": "https://dalleprodsec.blob.core.windows.net/x.png"}],
    },
}
FAILURE = {
    "success": False,
    "error": {"code": "api_error", "message": "fetch failed"},
    "trace_id": "2cf86e86-22a4-46e1-ac2f-032c0f2a4e89",
}


def test_success_callback_from_the_seed() -> None:
    report = XhuoapiDialect().parse(SUCCESS)
    assert report.state is TaskState.SUCCEEDED
    assert report.upstream_task_id == SUCCESS["task_id"]
    assert report.images == (SUCCESS["data"]["data"][0],)


def test_failure_callback_from_the_seed() -> None:
    report = XhuoapiDialect().parse(FAILURE)
    assert report.state is TaskState.FAILED
    assert report.upstream_task_id is None
    assert report.error == {"code": "api_error", "message": "fetch failed"}


def test_success_without_images_is_a_failure() -> None:
    report = XhuoapiDialect().parse({"success": True, "task_id": "t", "data": {"data": []}})
    assert report.state is TaskState.FAILED and report.error is not None
    assert report.error["code"] == "empty_result"


def test_a_callback_in_the_synchronous_answers_flat_shape_is_read_too() -> None:
    # Seed 004's gpt-image-2 answer: `data` is the list of images itself, not `{created, data}`.
    flat = {"success": True, "task_id": "ab58", "created": 1777048800,
            "data": [{"revised_prompt": "a portrait", "url": "https://platform.cdn.xhuoapi.ai/gpt-image/ab58_0.png"}]}
    report = XhuoapiDialect().parse(flat)
    assert report.state is TaskState.SUCCEEDED and report.upstream_task_id == "ab58"
    assert report.images == ({"url": "https://platform.cdn.xhuoapi.ai/gpt-image/ab58_0.png",
                              "revised_prompt": "a portrait"},)
    assert XhuoapiDialect().parse({**flat, "data": []}).error["code"] == "empty_result"


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({"success": "yes"}, id="success-not-bool"),
        pytest.param({"success": True}, id="no-data"),
        pytest.param({"success": True, "data": "images"}, id="data-neither-object-nor-list"),
        pytest.param({"success": True, "data": [{"nope": 1}]}, id="flat-image-without-url"),
        pytest.param({"success": True, "data": {"data": [1]}}, id="image-not-object"),
        pytest.param({"success": True, "data": {"data": [{"nope": 1}]}}, id="image-without-url"),
        pytest.param({"success": True, "task_id": ["x"], "data": {"data": [{"url": "u"}]}}, id="task-id-list"),
    ],
)
def test_malformed_callbacks_are_invalid_payloads(payload) -> None:
    with pytest.raises(InvalidPayload):
        XhuoapiDialect().parse(payload)


def test_auto_detects_xhuoapi() -> None:
    assert detect(SUCCESS).name == "xhuoapi"
    assert dialect_for("auto", FAILURE).name == "xhuoapi"
    with pytest.raises(InvalidPayload):
        detect({"hello": "world"})


def _task() -> Task:
    return Task(
        id="tsk_1", provider="xhuoapi", model="gpt-image-2", state=TaskState.QUEUED,
        request={"prompt": "p", "size": "1024x1024"}, created_at=0, updated_at=0, expires_at=1,
    )


async def _submit(handler) -> object:
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        provider = XhuoapiProvider(ProviderSettings("https://up.example", Secret("k")), client, timeout=5)
        return await provider.submit(_task(), "https://me.example/callbacks/t")


@pytest.mark.anyio
async def test_submission_sends_the_callback_url_and_key() -> None:
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["url"] = str(request.url)
        seen["auth"] = request.headers["authorization"]
        seen["body"] = request.read()
        return httpx.Response(200, json={"task_id": "up-1"})

    submission = await _submit(handler)
    assert submission.upstream_task_id == "up-1"
    assert seen["url"] == "https://up.example/v1/openai/images/generations"
    assert seen["auth"] == "Bearer k"
    assert b'"callback_url":"https://me.example/callbacks/t"' in seen["body"]
    assert b'"size":"1024x1024"' in seen["body"] and b'"model":"gpt-image-2"' in seen["body"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "code"),
    [(400, "upstream_invalid_parameters"), (401, "upstream_unauthorized"), (402, "upstream_billing"),
     (429, "upstream_rate_limited"), (500, "upstream_error"), (503, "upstream_error")],
)
async def test_refusals_carry_the_providers_error(status: int, code: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"success": False, "error": {"code": "x", "message": "no way"}})

    with pytest.raises(ProviderError) as caught:
        await _submit(handler)
    assert caught.value.code == code and caught.value.status_code == status
    assert "no way" in caught.value.message
    assert caught.value.body["error"]["code"] == "x"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("response", "code"),
    [
        pytest.param(httpx.Response(200, text="<html>"), "upstream_garbled", id="html"),
        pytest.param(httpx.Response(200, json=[1]), "upstream_garbled", id="list"),
        pytest.param(httpx.Response(200, json={}), "upstream_garbled", id="no-task-id"),
        pytest.param(httpx.Response(200, json={"success": False, "error": {"code": "quota", "message": "m"}}),
                     "quota", id="2xx-but-refused"),
    ],
)
async def test_garbled_answers_are_provider_errors(response: httpx.Response, code: str) -> None:
    with pytest.raises(ProviderError) as caught:
        await _submit(lambda request: response)
    assert caught.value.code == code


@pytest.mark.anyio
@pytest.mark.parametrize("status", [200, 400, 502])
async def test_an_error_body_nested_too_deep_is_kept_as_text(status: int) -> None:
    deep = b"[" * 300 + b"]" * 300
    content = deep if status == 200 else b'{"error": ' + deep + b"}"
    with pytest.raises(ProviderError) as caught:
        await _submit(lambda request: httpx.Response(status, content=content))
    error = caught.value.as_task_error()
    assert orjson.dumps(error)  # the task that keeps it can still be written and read
    assert error["body"] == content.decode()[:1024]


@pytest.mark.anyio
async def test_unreachable_and_slow_providers() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    def hang(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    with pytest.raises(ProviderError) as caught:
        await _submit(refuse)
    assert caught.value.code == "upstream_unreachable"
    with pytest.raises(ProviderError) as caught:
        await _submit(hang)
    assert caught.value.code == "upstream_timeout"


@pytest.mark.anyio
async def test_a_synchronous_answer_is_a_result() -> None:
    answer = {"created": 0, "data": [{"url": "https://cdn/x.png", "revised_prompt": "p"}]}
    submission = await _submit(lambda request: httpx.Response(200, json=answer))
    assert submission.upstream_task_id is None
    assert submission.report is not None and submission.report.state is TaskState.SUCCEEDED
