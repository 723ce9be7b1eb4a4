"""Replicate: the prediction dialect, submissions, and Standard Webhooks verification.

Callbacks are signed here with the `standardwebhooks` library, as Replicate signs them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from standardwebhooks import Webhook
from starlette.datastructures import Secret

from receiver.clock import FakeClock
from receiver.config import ProviderSettings, new_webhook_secret
from receiver.errors import InvalidParameters, InvalidPayload, InvalidProviderSignature, ProviderError
from receiver.providers import DIALECTS, detect
from receiver.providers.catalog import validate
from receiver.providers.replicate import ReplicateDialect, ReplicateProvider, ReplicateSignature
from receiver.tasks import Task
from receiver.types import TaskState
from tests.conftest import start_receiver

SECRET = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"
NOW = 1_790_000_000

PREDICTION = {
    "id": "ufawqhfynnddngldkgtslldrkq",
    "model": "black-forest-labs/flux-schnell",
    "version": "5599ed30703defd1d160a25a63321b4dec97101d98b4674bcc56e41f62f35637",
    "input": {"prompt": "a lighthouse"},
    "logs": "",
    "output": None,
    "error": None,
    "status": "starting",
    "created_at": "2026-09-21T08:00:00.000Z",
    "urls": {"get": "https://api.replicate.com/v1/predictions/ufawqhfynnddngldkgtslldrkq"},
}


def prediction(**changes: Any) -> dict[str, Any]:
    return {**PREDICTION, **changes}


def signed(body: bytes, *, secret: str = SECRET, timestamp: int = NOW, msg_id: str = "msg_2kQm") -> dict[str, str]:
    """Standard Webhooks headers for `body`, made by the library, as Replicate makes them."""
    signature = Webhook(secret).sign(msg_id, datetime.fromtimestamp(timestamp, UTC), body.decode())
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp), "webhook-signature": signature}


# --- the dialect --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "state"),
    [
        pytest.param("starting", TaskState.RUNNING, id="starting"),
        pytest.param("processing", TaskState.RUNNING, id="processing"),
        pytest.param("canceled", TaskState.CANCELLED, id="canceled"),
        pytest.param("aborted", TaskState.FAILED, id="aborted"),  # ended before it started
    ],
)
def test_statuses(status: str, state: TaskState) -> None:
    report = ReplicateDialect().parse(prediction(status=status))
    assert report.state is state and report.upstream_task_id == PREDICTION["id"] and report.dialect == "replicate"
    if status == "aborted":
        assert report.error is not None and report.error["code"] == "upstream_aborted"


@pytest.mark.parametrize(
    ("output", "urls"),
    [
        pytest.param("https://replicate.delivery/a.webp", ["https://replicate.delivery/a.webp"], id="one-url"),
        pytest.param(["https://r.d/a.png", "https://r.d/b.png"], ["https://r.d/a.png", "https://r.d/b.png"],
                     id="list-of-urls"),
        pytest.param([{"url": "https://r.d/a.png"}], ["https://r.d/a.png"], id="list-of-objects"),
    ],
)
def test_succeeded_output(output: Any, urls: list[str]) -> None:
    report = ReplicateDialect().parse(prediction(status="succeeded", output=output, metrics={"predict_time": 1.2}))
    assert report.state is TaskState.SUCCEEDED
    assert [image["url"] for image in report.images] == urls


def test_succeeded_without_output_fails_the_task() -> None:
    report = ReplicateDialect().parse(prediction(status="succeeded", output=None))
    assert report.state is TaskState.FAILED and report.error is not None and report.error["code"] == "empty_result"


def test_failed_keeps_replicates_error() -> None:
    report = ReplicateDialect().parse(prediction(status="failed", error="CUDA out of memory"))
    assert report.state is TaskState.FAILED
    assert report.error == {"code": "upstream_failed", "message": "CUDA out of memory"}


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(prediction(status="done"), id="unknown-status"),
        pytest.param(prediction(status=None), id="no-status"),
        pytest.param(prediction(status="succeeded", output=[1, 2]), id="output-of-numbers"),
        pytest.param(prediction(status="succeeded", output=7), id="output-a-number"),
        pytest.param(prediction(id=["x"]), id="id-a-list"),
    ],
)
def test_malformed_predictions_are_invalid_payloads(payload: dict[str, Any]) -> None:
    with pytest.raises(InvalidPayload):
        ReplicateDialect().parse(payload)


# Shapes of the other dialects (DESIGN §2): none may read as a Replicate prediction.
OTHER_SHAPES = [
    pytest.param({"success": True, "task_id": "t", "data": {"data": [{"url": "u"}]}}, id="xhuoapi"),
    pytest.param({"code": 200, "msg": "ok", "data": {"taskId": "t", "info": {"resultImageUrl": "u"}}}, id="kie"),
    pytest.param({"task_id": "t", "task_status": "failed", "task_status_msg": "m", "created_at": 1,
                  "updated_at": 2, "task_result": {"images": []}}, id="kling"),
    pytest.param({"id": "t", "status": "failed", "progress": 0, "result": {"images": []}}, id="apimart-failed"),
    pytest.param({"id": "t", "status": "completed", "progress": 100,
                  "result": {"images": [{"url": ["u"], "expires_at": 1}]}}, id="apimart-completed"),
    pytest.param({"request_id": "r", "gateway_request_id": "r", "status": "OK", "payload": {"images": []}},
                 id="fal"),
]


@pytest.mark.parametrize("status", [["succeeded"], {"a": 1}], ids=["list", "object"])
def test_a_status_that_is_not_a_string_is_an_invalid_payload_not_a_crash(status: Any) -> None:
    payload = prediction(status=status)
    assert not ReplicateDialect().detect(payload)
    with pytest.raises(InvalidPayload):
        detect(payload)
    with pytest.raises(InvalidPayload):
        ReplicateDialect().parse(payload)


@pytest.mark.parametrize("payload", OTHER_SHAPES)
def test_detection_does_not_claim_other_dialects(payload: dict[str, Any]) -> None:
    assert not ReplicateDialect().detect(payload)


@pytest.mark.parametrize("status", ["starting", "processing", "succeeded", "failed", "canceled", "aborted"])
def test_auto_detects_every_prediction_as_replicate_only(status: str) -> None:
    payload = prediction(status=status)
    assert detect(payload).name == "replicate"
    assert [name for name, dialect in DIALECTS.items() if dialect.detect(payload)] == ["replicate"]


# --- the catalog: free-form models, parameters passed through to `input` ------------------


@pytest.mark.parametrize(
    "model",
    [
        pytest.param("black-forest-labs/flux-schnell", id="owner-name"),
        pytest.param("stability-ai/sdxl:" + "a" * 64, id="owner-name-version"),
        pytest.param("5599ed30703defd1d160a25a63321b4dec97101d98b4674bcc56e41f62f35637", id="version"),
    ],
)
def test_catalog_accepts_replicate_model_forms(model: str) -> None:
    request = validate({"provider": "replicate", "model": model, "prompt": "p", "num_outputs": 2,
                        "aspect_ratio": "16:9", "go_fast": True, "webhook_events_filter": ["completed"]})
    assert request.params == {"num_outputs": 2, "aspect_ratio": "16:9", "go_fast": True,
                              "webhook_events_filter": ["completed"]}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        pytest.param({"model": "flux"}, "model", id="no-owner"),
        pytest.param({"model": "a/b/c"}, "model", id="three-parts"),
        pytest.param({"model": "../etc"}, "model", id="dot-dot"),
        pytest.param({"model": "owner/name:latest"}, "model", id="version-not-hex"),
        pytest.param({"webhook_events_filter": ["completed", "done"]}, "webhook_events_filter", id="unknown-event"),
        pytest.param({"webhook_events_filter": []}, "webhook_events_filter", id="no-event"),
        pytest.param({"webhook_events_filter": "completed"}, "webhook_events_filter", id="events-not-a-list"),
    ],
)
def test_catalog_refuses_bad_replicate_requests(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidParameters) as caught:
        validate({"provider": "replicate", "model": "owner/name", "prompt": "p", **changes})
    assert [f["field"] for f in caught.value.fields] == [field]


# --- submission ---------------------------------------------------------------------


def _task(model: str, **request: Any) -> Task:
    return Task(
        id="tsk_1", provider="replicate", model=model, state=TaskState.QUEUED,
        request={"prompt": "a lighthouse", **request}, created_at=0, updated_at=0, expires_at=1,
    )


async def _submit(task: Task, handler) -> Any:
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        settings = ProviderSettings("https://api.replicate.test", Secret("r8_key"))
        provider = ReplicateProvider(settings, client, timeout=5)
        return await provider.submit(task, "https://me.example/callbacks/tok")


def _recording(seen: list[httpx.Request], answer: httpx.Response | None = None):
    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        return answer or httpx.Response(201, json=prediction())

    return handler


@pytest.mark.anyio
async def test_an_owner_name_model_posts_to_the_models_endpoint() -> None:
    seen: list[httpx.Request] = []
    submission = await _submit(_task("black-forest-labs/flux-schnell", num_outputs=2), _recording(seen))
    assert submission.upstream_task_id == PREDICTION["id"] and submission.report is None
    request = seen[0]
    assert str(request.url) == "https://api.replicate.test/v1/models/black-forest-labs/flux-schnell/predictions"
    assert request.headers["authorization"] == "Bearer r8_key"
    assert orjson.loads(request.content) == {
        "input": {"prompt": "a lighthouse", "num_outputs": 2},
        "webhook": "https://me.example/callbacks/tok",
        "webhook_events_filter": ["start", "completed"],
    }


@pytest.mark.anyio
@pytest.mark.parametrize(
    "model",
    [
        pytest.param(PREDICTION["version"], id="bare-version"),
        pytest.param(f"black-forest-labs/flux-schnell:{PREDICTION['version']}", id="owner-name-version"),
    ],
)
async def test_a_version_posts_to_predictions(model: str) -> None:
    seen: list[httpx.Request] = []
    await _submit(_task(model), _recording(seen))
    assert str(seen[0].url) == "https://api.replicate.test/v1/predictions"
    body = orjson.loads(seen[0].content)
    assert body["version"] == PREDICTION["version"] and body["input"] == {"prompt": "a lighthouse"}


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("events", "sent"),
    [
        pytest.param(["start", "output", "logs", "completed"], ["start", "output", "logs", "completed"], id="all"),
        pytest.param(["completed"], ["completed"], id="completed-only"),
        pytest.param(["start", "logs"], ["start", "logs", "completed"], id="completed-always-added"),
    ],
)
async def test_the_events_filter_is_configurable(events: list[str], sent: list[str]) -> None:
    seen: list[httpx.Request] = []
    await _submit(_task("owner/model", webhook_events_filter=events), _recording(seen))
    body = orjson.loads(seen[0].content)
    assert body["webhook_events_filter"] == sent and "webhook_events_filter" not in body["input"]


@pytest.mark.anyio
async def test_an_answer_that_already_finished_is_a_result() -> None:
    done = prediction(status="succeeded", output=["https://r.d/a.png"])
    submission = await _submit(_task("owner/model"), _recording([], httpx.Response(201, json=done)))
    assert submission.report is not None and submission.report.state is TaskState.SUCCEEDED


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("response", "code"),
    [
        pytest.param(httpx.Response(422, json={"title": "Invalid input", "detail": "prompt is required"}),
                     "upstream_error", id="422"),
        pytest.param(httpx.Response(401, json={"title": "Unauthenticated", "detail": "Invalid token."}),
                     "upstream_unauthorized", id="401"),
        pytest.param(httpx.Response(402, json={"detail": "Insufficient credit"}), "upstream_billing", id="402"),
        pytest.param(httpx.Response(201, json={"status": "starting"}), "upstream_garbled", id="no-id"),
        pytest.param(httpx.Response(201, text="<html>"), "upstream_garbled", id="not-json"),
    ],
)
async def test_refusals_and_garbled_answers(response: httpx.Response, code: str) -> None:
    with pytest.raises(ProviderError) as caught:
        await _submit(_task("owner/model"), lambda request: response)
    assert caught.value.code == code and caught.value.provider == "replicate"


@pytest.mark.anyio
async def test_an_answer_whose_status_is_not_a_string_waits_for_the_webhook() -> None:
    answer = httpx.Response(201, json={"id": "p1", "status": ["succeeded"]})
    submission = await _submit(_task("owner/model"), lambda request: answer)
    assert submission.upstream_task_id == "p1" and submission.report is None


# --- the signature ------------------------------------------------------------------

BODY = orjson.dumps(prediction(status="succeeded", output=["https://r.d/a.png"]))


def _verifier(secret: str | None = SECRET) -> ReplicateSignature:
    return ReplicateSignature(Secret(secret) if secret else None, clock=FakeClock(NOW))


@pytest.mark.anyio
@pytest.mark.parametrize(
    "timestamp",
    [pytest.param(NOW, id="now"), pytest.param(NOW - 299, id="almost-stale"), pytest.param(NOW + 299, id="ahead")],
)
async def test_a_signature_made_by_the_library_verifies(timestamp: int) -> None:
    await _verifier().verify(BODY, signed(BODY, timestamp=timestamp))


@pytest.mark.anyio
async def test_one_matching_signature_among_several_is_enough() -> None:
    headers = signed(BODY)
    other = signed(BODY, secret=new_webhook_secret())["webhook-signature"]
    headers["webhook-signature"] = f"v2,abc {other} garbage {headers['webhook-signature']}"
    await _verifier().verify(BODY, headers)


def _forgeries() -> list[Any]:
    good = signed(BODY)
    sig = good["webhook-signature"]
    return [
        pytest.param(BODY.replace(b"a.png", b"evil.png"), good, "mismatch", id="tampered-body"),
        pytest.param(BODY, signed(BODY, timestamp=NOW - 301), "stale_timestamp", id="stale-timestamp"),
        pytest.param(BODY, signed(BODY, timestamp=NOW + 301), "future_timestamp", id="future-timestamp"),
        pytest.param(BODY, signed(BODY, secret=new_webhook_secret()), "mismatch", id="wrong-secret"),
        pytest.param(BODY, {**good, "webhook-id": "msg_other"}, "mismatch", id="other-message-id"),
        pytest.param(BODY, {k: v for k, v in good.items() if k != "webhook-id"}, "missing_headers", id="no-id"),
        pytest.param(BODY, {k: v for k, v in good.items() if k != "webhook-timestamp"}, "missing_headers",
                     id="no-timestamp"),
        pytest.param(BODY, {k: v for k, v in good.items() if k != "webhook-signature"}, "missing_headers",
                     id="no-signature"),
        pytest.param(BODY, {}, "missing_headers", id="no-headers"),
        pytest.param(BODY, {**good, "webhook-signature": sig.replace(",", "")}, "mismatch", id="no-comma"),
        pytest.param(BODY, {**good, "webhook-signature": "v1,not*base64!"}, "mismatch", id="not-base64"),
        pytest.param(BODY, {**good, "webhook-signature": "v1,"}, "mismatch", id="empty-signature"),
        pytest.param(BODY, {**good, "webhook-signature": "v2," + sig[3:]}, "mismatch", id="other-version"),
        pytest.param(BODY, {**good, "webhook-signature": "v1"}, "mismatch", id="version-alone"),
        pytest.param(BODY, {**good, "webhook-timestamp": "yesterday"}, "malformed_timestamp", id="timestamp-word"),
        pytest.param(BODY, {**good, "webhook-timestamp": "1.79e9"}, "malformed_timestamp", id="timestamp-float"),
        pytest.param(BODY, {**good, "webhook-timestamp": "-1"}, "malformed_timestamp", id="timestamp-negative"),
        pytest.param(BODY, {**good, "webhook-timestamp": "9" * 40}, "malformed_timestamp", id="timestamp-huge"),
        pytest.param(BODY, {**good, "webhook-timestamp": "1790000000\xb2"}, "malformed_timestamp",
                     id="timestamp-latin1"),
        pytest.param(b"\xff\xfe" + BODY, good, "malformed_body", id="not-utf8"),
    ]


@pytest.mark.anyio
@pytest.mark.parametrize(("body", "headers", "reason"), _forgeries())
async def test_forgeries_are_refused(body: bytes, headers: dict[str, str], reason: str) -> None:
    with pytest.raises(InvalidProviderSignature) as caught:
        await _verifier().verify(body, {k.lower(): v for k, v in headers.items()})
    assert caught.value.reason == reason and caught.value.code == "invalid_provider_signature"


@pytest.mark.anyio
async def test_while_the_secret_is_rotated_either_one_verifies() -> None:
    old, new, other = SECRET, new_webhook_secret(), new_webhook_secret()
    verifier = _verifier(f"{new}, {old}")
    await verifier.verify(BODY, signed(BODY, secret=old))
    await verifier.verify(BODY, signed(BODY, secret=new))
    with pytest.raises(InvalidProviderSignature) as caught:
        await verifier.verify(BODY, signed(BODY, secret=other))
    assert caught.value.reason == "mismatch"


def test_without_a_secret_nothing_is_checked() -> None:
    verifier = _verifier(None)
    assert not verifier.configured
    assert "RECEIVER_REPLICATE_WEBHOOK_SECRET" in verifier.unchecked_warning


# --- through the receiver: both checks, nothing stored on a refusal ------------------


async def _mint(running, provider: str = "replicate") -> tuple[dict[str, Any], str]:
    minted = await running.api.post("/v1/callback-urls", json={"provider": provider})
    assert minted.status_code == 201, minted.text
    return minted.json()["task"], minted.json()["callback_url"]


@pytest.mark.anyio
async def test_a_signed_callback_is_accepted_and_marked_verified(tmp_path: Path) -> None:
    async with start_receiver(tmp_path, clock=FakeClock(NOW), replicate_webhook_secret=Secret(SECRET)) as running:
        task, url = await _mint(running)
        answer = await running.post_callback(url, content=BODY, headers={"content-type": "application/json",
                                                                         **signed(BODY)})
        assert answer.status_code == 200, answer.text
        done = (await running.api.get(f"/v1/tasks/{task['id']}")).json()
        assert done["state"] == "succeeded" and done["upstream_task_id"] == PREDICTION["id"]
        assert done["warnings"] == []
        logged = (await running.api.get(f"/v1/tasks/{task['id']}/callbacks")).json()["data"]
        assert [c["provider_signature"] for c in logged] == ["verified"]
        assert set(logged[0]["headers"]) >= {"webhook-id", "webhook-timestamp", "webhook-signature"}


@pytest.mark.anyio
@pytest.mark.parametrize("provider", ["replicate", "auto"])
async def test_a_leaked_url_without_a_valid_signature_changes_nothing(tmp_path: Path, provider: str, logs) -> None:
    async with start_receiver(tmp_path, clock=FakeClock(NOW), replicate_webhook_secret=Secret(SECRET)) as running:
        task, url = await _mint(running, provider)
        refused = 0
        for body, headers, reason in (p.values for p in _forgeries()):
            raw_headers = {k: v.encode("latin-1") for k, v in headers.items()}  # as sent on the wire
            answer = await running.post_callback(url, content=body, headers=raw_headers)
            error = answer.json()["error"]
            if provider == "auto" and reason == "malformed_body":
                # No dialect can be detected in a body that is not JSON: refused before any signature.
                assert answer.status_code == 400 and error["code"] == "invalid_payload"
                continue
            assert answer.status_code == 403, (reason, answer.text)
            assert error["code"] == "invalid_provider_signature" and error["details"]["reason"] == reason
            refused += 1
        after = (await running.api.get(f"/v1/tasks/{task['id']}")).json()
        assert after["state"] == "submitted" and after["sequence"] == task["sequence"]
        assert (await running.api.get(f"/v1/tasks/{task['id']}/callbacks")).json()["data"] == []
        metrics = (await running.api.get("/metrics")).text
        assert f'receiver_callbacks_total{{outcome="invalid_provider_signature"}} {refused}.0' in metrics
    logged = logs.events("callback.provider_signature_refused")
    assert len(logged) == refused and all(e["provider"] == "replicate" for e in logged)
    assert not any(SECRET in repr(r.__dict__) for r in logs.records)


@pytest.mark.anyio
async def test_without_a_secret_the_task_records_the_signature_was_not_checked(tmp_path: Path) -> None:
    async with start_receiver(tmp_path, clock=FakeClock(NOW)) as running:
        task, url = await _mint(running)
        answer = await running.post_callback(url, content=BODY, headers={"content-type": "application/json"})
        assert answer.status_code == 200, answer.text
        done = (await running.api.get(f"/v1/tasks/{task['id']}")).json()
        assert done["state"] == "succeeded"
        assert [w.split(":")[0] for w in done["warnings"]] == ["provider_signature_not_checked"]
        logged = (await running.api.get(f"/v1/tasks/{task['id']}/callbacks")).json()["data"]
        assert [c["provider_signature"] for c in logged] == ["unchecked"]


@pytest.mark.anyio
async def test_an_auto_task_checks_the_detected_dialects_signature(tmp_path: Path) -> None:
    async with start_receiver(tmp_path, clock=FakeClock(NOW), replicate_webhook_secret=Secret(SECRET)) as running:
        task, url = await _mint(running, "auto")
        start = orjson.dumps(prediction(status="processing"))
        assert (await running.post_callback(url, content=start, headers=signed(start))).status_code == 200
        adopted = (await running.api.get(f"/v1/tasks/{task['id']}")).json()
        assert adopted["provider"] == "replicate" and adopted["state"] == "running"
        # From now on the task is a Replicate task: every callback needs Replicate's signature, a
        # body of another dialect (which would need none) included, and is read as Replicate's.
        unsigned = orjson.dumps(prediction(status="succeeded"))
        answer = await running.post_callback(url, content=unsigned, headers={"content-type": "application/json"})
        assert answer.status_code == 403 and answer.json()["error"]["code"] == "invalid_provider_signature"
        forged = orjson.dumps({"success": True, "task_id": PREDICTION["id"], "data": {"data": [{"url": "u"}]}})
        answer = await running.post_callback(url, content=forged, headers={"content-type": "application/json"})
        assert answer.status_code == 403 and answer.json()["error"]["code"] == "invalid_provider_signature"
        answer = await running.post_callback(url, content=forged, headers=signed(forged))
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_payload"
        after = (await running.api.get(f"/v1/tasks/{task['id']}")).json()
        assert after["state"] == "running" and after["sequence"] == adopted["sequence"]
        assert len((await running.api.get(f"/v1/tasks/{task['id']}/callbacks")).json()["data"]) == 1
