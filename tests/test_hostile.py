"""Hostile input: property-based tests of every dialect parser and of the callback endpoint.

Parsers get arbitrary JSON (and JSON shaped like their own dialect, so the deep branches are
reached): they return a Report or raise InvalidPayload, nothing else, and what they return can
be stored. The endpoint, on a real socket, gets arbitrary bytes, JSON, tokens and headers: never
a 5xx, every refusal in the contract's error shape, and a refused callback changes nothing
stored (the task and its callback log are compared before and after).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.datastructures import Secret

from receiver.errors import InvalidPayload
from receiver.nesting import MAX_DEPTH, too_deep
from receiver.providers import DIALECTS, detect, dialect_for
from receiver.providers.router import RouterProvider
from receiver.providers.xenodia import XenodiaTaskDialect
from receiver.tasks import Report
from receiver.types import TaskState
from tests.conftest import API_KEY, Running, database_for, needs_postgres, start_receiver

pytestmark = pytest.mark.anyio

# --- strategies -------------------------------------------------------------------

#: What orjson.loads can hand a parser: 64-bit integers, finite floats, any text.
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(["", "0", "https://cdn.example/a.png", "\u202e\ufeff", "日本語", "null"])
)
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
#: Keys and values the dialects look at, so generated payloads reach their inner branches.
KEYS = [
    "success", "task_id", "trace_id", "data", "error", "code", "msg", "taskId", "info", "resultImageUrl",
    "originImageUrl", "resultUrls", "task_status", "task_status_msg", "task_result", "images", "image", "url",
    "index", "id", "status", "progress", "result", "output", "urls", "version", "input", "request_id",
    "gateway_request_id", "payload", "payload_error", "state", "object", "expires_at", "message", "b64_json",
    "revised_prompt", "fail_reason",
]
MEANINGFUL = st.sampled_from([
    True, False, 200, 400, 500, 501, "succeed", "submitted", "processing", "failed", "completed", "OK", "ERROR",
    "succeeded", "canceled", "starting", "task", "waiting", "running", "https://cdn.example/b.png", [], {},
])
SHAPED_VALUES = st.recursive(
    SCALARS | MEANINGFUL,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=5),
    max_leaves=25,
)
PAYLOADS = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), SHAPED_VALUES, max_size=7) | st.dictionaries(
    st.text(max_size=8), JSON_VALUES, max_size=5
)


def nested(depth: int, *, key: str = "a") -> Any:
    value: Any = {}
    for _ in range(depth):
        value = {key: value} if key else [value]
    return value


# --- parsers ----------------------------------------------------------------------

PARSERS = {
    **{name: dialect.parse for name, dialect in DIALECTS.items()},
    "xenodia": XenodiaTaskDialect().parse,
    "router": RouterProvider.read.__get__(object.__new__(RouterProvider)),
    "auto": lambda payload: detect(payload).parse(payload),
}


def check_report(report: Report, *, storable: bool = True) -> None:
    assert isinstance(report, Report) and isinstance(report.state, TaskState)
    assert report.upstream_task_id is None or isinstance(report.upstream_task_id, str)
    for image in report.images:
        assert isinstance(image, dict)
        assert isinstance(image.get("url"), str) or isinstance(image.get("b64_json"), str)
    if report.progress is not None:
        assert math.isfinite(report.progress)
    # What the store writes must serialise: the result, the error, the warnings (the receiver
    # refuses bodies nested deeper than MAX_DEPTH before parsing; orjson writes only 254 levels).
    if storable:
        orjson.dumps({"result": report.result(), "error": report.error, "warnings": report.warnings})


def parse_or_refuse(name: str, payload: Any) -> Report | None:
    try:
        report = PARSERS[name](payload)
    except InvalidPayload as exc:
        assert exc.status_code == 400 and exc.code == "invalid_payload" and exc.message
        return None
    check_report(report, storable=not too_deep(payload))
    return report


@pytest.mark.parametrize("name", sorted(PARSERS))
@settings(max_examples=150, deadline=None)
@given(payload=PAYLOADS)
def test_parsers_return_a_report_or_refuse_with_invalid_payload(name: str, payload: dict[str, Any]) -> None:
    parse_or_refuse(name, payload)


@settings(max_examples=300, deadline=None)
@given(payload=PAYLOADS)
def test_detection_is_a_yes_or_no(payload: dict[str, Any]) -> None:
    claimed = [dialect.name for dialect in DIALECTS.values() if dialect.detect(payload) is True]
    assert all(isinstance(dialect.detect(payload), bool) for dialect in DIALECTS.values())
    assert isinstance(XenodiaTaskDialect().detect(payload), bool)
    try:
        found = dialect_for("auto", payload)
    except InvalidPayload:
        assert len(claimed) != 1
    else:
        assert claimed == [found.name]


def nested_lists(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


DEEPER_JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=80,
)


@given(DEEPER_JSON, st.integers(min_value=1, max_value=8))
def test_the_bracket_count_shortcut_never_changes_the_nesting_verdict(value: Any, limit: int) -> None:
    """too_deep skips its walk when the text has no more `{`/`[` than the limit; strings holding
    brackets only make it walk more."""
    text = orjson.dumps(value)
    assert too_deep(value, limit, source=text) == too_deep(value, limit)


@pytest.mark.parametrize("depth", [MAX_DEPTH, MAX_DEPTH + 1])
def test_the_bracket_count_shortcut_at_the_limit(depth: int) -> None:
    value = nested_lists(depth)
    assert too_deep(value, source=orjson.dumps(value)) is (depth > MAX_DEPTH)
    padded = {"note": "[" * 200, "value": value}  # brackets in a string: the walk decides
    assert too_deep(padded, source=orjson.dumps(padded)) is (depth + 1 > MAX_DEPTH)


@pytest.mark.parametrize("name", sorted(PARSERS))
@pytest.mark.parametrize("depth", [MAX_DEPTH - 2, 1000])
def test_parsers_take_deep_nesting_in_every_field(name: str, depth: int) -> None:
    for key in KEYS:
        for deep in (nested(depth), nested(depth, key=""), nested(depth, key=key)):
            parse_or_refuse(name, {key: deep})
            parse_or_refuse(name, {"success": False, "status": "ERROR", "request_id": "r", "gateway_request_id": 1,
                                   "code": 500, "msg": "x", "task_status": "failed", "task_id": "t", key: deep})


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_parsers_take_huge_numbers_and_odd_text(name: str) -> None:
    for value in (2**64 - 1, -(2**63), 1.7976931348623157e308, -0.0, 5e-324, "\x00", "\ud7ff" * 1000, "a" * 100_000):
        for key in KEYS:
            parse_or_refuse(name, {key: value})
            parse_or_refuse(name, {"status": "completed", "id": value, "progress": value,
                                   "result": {"images": [{"url": ["https://x/1.png"], "expires_at": value}]}})


# --- the endpoint on a real socket --------------------------------------------------

DIALECT_NAMES = ["auto", "kie", "kling", "apimart", "xhuoapi", "replicate", "fal"]
HEADER_VALUES = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(str.strip)
HOSTILE_HEADERS = st.dictionaries(
    st.sampled_from(["webhook-id", "webhook-timestamp", "webhook-signature", "x-fal-webhook-request-id",
                     "x-fal-webhook-user-id", "x-fal-webhook-timestamp", "x-fal-webhook-signature",
                     "content-type", "x-receiver-source", "authorization"]),
    HEADER_VALUES
    | st.sampled_from(["v1,", "v1,!!!", "99999999999", "1", "ab" * 64, "application/x-www-form-urlencoded"]),
    max_size=4,
)
BODIES = (
    PAYLOADS.map(orjson.dumps)
    | JSON_VALUES.map(orjson.dumps)
    | st.binary(max_size=200)
    | st.sampled_from([
        b"", b"{", b"null", b"[]", b'"x"', b"1e400", b"{\"a\": 1e999}", b"\xff\xfe{}", b'{"a": "\\ud800"}',
        b"[" * 2000 + b"]" * 2000, b'{"a":' * 200 + b"{}" + b"}" * 200,
        b'{"status": "ERROR", "request_id": "r", "gateway_request_id": "g", "payload": '
        + b'{"a":' * 300 + b"{}" + b"}" * 300 + b"}",
        b'{"success": false, "error": ' + b"[" * 500 + b"]" * 500 + b"}",
        b'{"id": 123456789012345678901234567890}',
    ])
)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=needs_postgres)])
async def hostile(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Running]:
    """On each database: PostgreSQL refuses text SQLite takes (a NUL), so bad input must be caught
    before the store on both."""
    # fal's key set off (no network); Replicate's secret set, so its signature check is on the path.
    async with database_for(request.param, tmp_path / "hostile.db") as url, start_receiver(
        tmp_path, database_url=url, fal_jwks_url=None,
        replicate_webhook_secret=Secret("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"), max_body_bytes=64 * 1024,
    ) as running:
        yield running


async def stored(running: Running, task_id: str) -> tuple[Any, Any]:
    task = (await running.api.get(f"/v1/tasks/{task_id}")).json()
    callbacks = (await running.api.get(f"/v1/tasks/{task_id}/callbacks")).json()
    return task, callbacks


def assert_error_shape(answer: httpx.Response) -> dict[str, Any]:
    body = answer.json()
    assert set(body) <= {"error", "task"} and "error" in body, body
    error = body["error"]
    assert set(error) <= {"code", "message", "details"}, error
    assert isinstance(error["code"], str) and error["code"].replace("_", "").isalnum() and error["code"].islower()
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error.get("details", {}), dict)
    return error


async def post_hostile(running: Running, url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as raw:
        answer = await raw.post(url, content=body, headers=headers)
    assert answer.status_code < 500, (answer.status_code, answer.text[:300], body[:200])
    return answer


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dialect=st.sampled_from(DIALECT_NAMES), body=BODIES, headers=HOSTILE_HEADERS, suffix=st.booleans())
async def test_callbacks_never_5xx_and_refusals_change_nothing(
    hostile: Running, dialect: str, body: bytes, headers: dict[str, str], suffix: bool
) -> None:
    minted = (await hostile.api.post("/v1/callback-urls", json={"provider": dialect})).json()
    task_id = minted["task"]["id"]
    before = await stored(hostile, task_id)
    answer = await post_hostile(hostile, minted["callback_url"] + ("/callback" if suffix else ""), body, headers)
    after = await stored(hostile, task_id)
    if answer.status_code == 200:
        ack = answer.json()
        assert ack["ok"] is True and ack["task_id"] == task_id and isinstance(ack["duplicate"], bool)
        assert len(after[1]["data"]) == len(before[1]["data"]) + 1  # logged
    else:
        error = assert_error_shape(answer)
        assert (answer.status_code, error["code"]) in {
            (400, "invalid_payload"), (403, "invalid_provider_signature"), (409, "task_mismatch"),
            (413, "payload_too_large"),
        }, (answer.status_code, error)
        assert after == before  # a refused callback changes nothing stored


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(token=st.text(max_size=120), body=BODIES)
async def test_any_token_is_refused_in_the_error_shape(hostile: Running, token: str, body: bytes) -> None:
    answer = await post_hostile(hostile, f"{hostile.url}/callbacks/{quote(token, safe='')}", body, {})
    # 307: an empty token is Starlette's slash redirect to `/callbacks` (nothing is read or stored).
    assert answer.status_code in (307, 403, 404, 405, 410), (answer.status_code, answer.text)
    if answer.status_code not in (307, 405):
        assert_error_shape(answer)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from(["/v1/tasks", "/v1/callback-urls", "/v1/subscriptions"]),
    body=PAYLOADS.map(orjson.dumps) | BODIES,
)
async def test_management_bodies_never_5xx(hostile: Running, path: str, body: bytes) -> None:
    before = (await hostile.api.get("/v1/tasks", params={"limit": 100})).json()["data"]
    async with httpx.AsyncClient(timeout=10) as raw:
        answer = await raw.post(hostile.url + path, content=body, headers={
            "authorization": f"Bearer {API_KEY}", "content-type": "application/json"})
    assert answer.status_code < 500 or answer.status_code == 502, (answer.status_code, answer.text[:300])
    if answer.status_code >= 400:
        error = assert_error_shape(answer)
        if answer.status_code == 502:  # the provider refused: the task is stored as failed, and shown
            assert answer.json()["task"]["state"] == "failed"
        else:
            assert error["code"] in {"invalid_request", "invalid_parameters", "url_not_allowed",
                                     "payload_too_large", "provider_not_found"}, error
            after = (await hostile.api.get("/v1/tasks", params={"limit": 100})).json()["data"]
            assert [t["id"] for t in after] == [t["id"] for t in before]


NUL_BODIES = [  # (path, body, the status expected on both databases)
    ("/v1/subscriptions", {"url": "https://example.com/hook", "events": ["*"], "description": "a\x00b"}, 400),
    ("/v1/subscriptions", {"url": "https://example.com/ho\x00ok", "events": ["*"]}, 400),
    ("/v1/tasks", {"provider": "router", "model": "openai/gpt\x00image-1", "prompt": "p"}, 400),
    # stored (JSON text escapes the NUL); 502: no provider answers in this test
    ("/v1/tasks", {"provider": "xhuoapi", "model": "gpt-image-2", "prompt": "p\x00", "metadata": {"k\x00": "v"}}, 502),
    ("/v1/tasks", {"provider": "xhuoapi", "model": "gpt-image-2", "prompt": "p", "notify_url": "https://e/\x00"}, 400),
    ("/v1/callback-urls", {"provider": "kie", "metadata": {"k": "\x00"}}, 201),
]


@pytest.mark.parametrize(("path", "body", "status"), NUL_BODIES)
async def test_a_nul_in_any_text_is_answered_alike_on_both_databases(
    hostile: Running, path: str, body: dict[str, Any], status: int
) -> None:
    """PostgreSQL text cannot hold a NUL (SQLite can): refused or kept the same way on both, never a 503."""
    answer = await hostile.api.post(path, json=body)
    assert answer.status_code == status, answer.text[:300]
    if answer.status_code >= 400:
        assert_error_shape(answer)
    for method, target, json in [
        ("POST", "/v1/tasks/tsk_%00/cancel", None),
        ("POST", "/v1/deliveries/dlv_%00/retry", None),
        ("PATCH", "/v1/subscriptions/sub_%00", {"enabled": False}),
        ("DELETE", "/v1/subscriptions/sub_%00", None),
        *[("POST", f"/v1/subscriptions/sub_%00/{action}", {}) for action in ("rotate-secret", "test", "recover")],
    ]:  # ids no row can hold: not found, on either database
        answer = await hostile.api.request(method, target, json=json)
        assert answer.status_code == 404, (method, target, answer.text)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=st.dictionaries(st.sampled_from(["limit", "cursor", "state", "provider", "upstream_task_id", "wait",
                                               "status", "task_id", "subscription_id"]),
                              st.text(max_size=30) | st.integers().map(str), max_size=3))
async def test_query_strings_never_5xx(hostile: Running, params: dict[str, str]) -> None:
    for path in ("/v1/tasks", "/v1/deliveries", "/v1/subscriptions", "/v1/tasks/tsk_nope"):
        if path.endswith("nope"):
            params = {k: v for k, v in params.items() if k != "wait"}
        answer = await hostile.api.get(path, params=params)
        assert answer.status_code < 500
        if answer.status_code >= 400:
            assert_error_shape(answer)


async def test_deep_nesting_is_refused_at_the_door(hostile: Running) -> None:
    """Bodies nested deeper than orjson writes (254) were stored, then every read of the task or its
    callback log answered 500; now anything deeper than MAX_DEPTH is a 400 and nothing is stored."""
    deep = b'{"a":' * (MAX_DEPTH + 1) + b"{}" + b"}" * (MAX_DEPTH + 1)
    for dialect, body in [
        ("fal", b'{"status": "ERROR", "request_id": "r", "gateway_request_id": "g", "payload": ' + deep + b"}"),
        ("xhuoapi", b'{"success": false, "error": ' + deep + b"}"),
    ]:
        minted = (await hostile.api.post("/v1/callback-urls", json={"provider": dialect})).json()
        before = await stored(hostile, minted["task"]["id"])
        answer = await post_hostile(hostile, minted["callback_url"], body, {})
        assert answer.status_code == 400 and assert_error_shape(answer)["code"] == "invalid_payload"
        assert await stored(hostile, minted["task"]["id"]) == before
        shallow = body.replace(deep, orjson.dumps(nested(MAX_DEPTH - 3)))
        assert (await post_hostile(hostile, minted["callback_url"], shallow, {})).status_code == 200
        assert (await hostile.api.get(f"/v1/tasks/{minted['task']['id']}/callbacks")).status_code == 200
    refused = await hostile.api.post("/v1/callback-urls", content=b'{"provider": "kie", "metadata": ' + deep + b"}")
    assert refused.status_code == 400 and assert_error_shape(refused)["code"] == "invalid_request"
