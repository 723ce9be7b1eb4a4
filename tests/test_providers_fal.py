"""fal: the webhook dialect, queue submissions, and ED25519 verification against a key set.

The key set is served by a real server on 127.0.0.1, from key pairs generated here.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from starlette.applications import Starlette
from starlette.datastructures import Secret
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from receiver.clock import FakeClock
from receiver.config import ProviderSettings
from receiver.errors import (
    InvalidParameters,
    InvalidPayload,
    InvalidProviderSignature,
    ProviderError,
    SignatureKeysUnavailable,
)
from receiver.providers import DIALECTS, detect
from receiver.providers.catalog import validate
from receiver.providers.fal import FalDialect, FalProvider, FalSignature
from receiver.providers.jwks import MIN_INTERVAL, KeySet
from receiver.server import serve_in_background
from receiver.tasks import Task
from receiver.types import TaskState
from tests.conftest import start_receiver

NOW = 1_790_000_000
USER = "github|8421"
RESULT = {
    "request_id": "123e4567-e89b-12d3-a456-426614174000",
    "gateway_request_id": "123e4567-e89b-12d3-a456-426614174000",
    "status": "OK",
    "payload": {
        "images": [{"url": "https://v3.fal.media/a.png", "content_type": "image/png", "file_name": "a.png",
                    "file_size": 1824075, "width": 1024, "height": 1024}],
        "seed": 196619188014358660,
    },
}
BODY = orjson.dumps(RESULT)
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))  # fal's signing key, as far as the tests go


def jwk(key: Ed25519PrivateKey) -> dict[str, str]:
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "x": base64.urlsafe_b64encode(raw).rstrip(b"=").decode()}


def signed(body: bytes, key: Ed25519PrivateKey, *, timestamp: int = NOW, request_id: str = RESULT["request_id"],
           user_id: str = USER) -> dict[str, str]:
    """fal's headers: hex ED25519 over request_id, user_id, timestamp and the body's SHA-256, one per line."""
    message = f"{request_id}\n{user_id}\n{timestamp}\n{hashlib.sha256(body).hexdigest()}".encode()
    return {
        "x-fal-webhook-request-id": request_id,
        "x-fal-webhook-user-id": user_id,
        "x-fal-webhook-timestamp": str(timestamp),
        "x-fal-webhook-signature": key.sign(message).hex(),
    }


@dataclass
class JwksServer:
    """A key set served on a real socket; tests add keys, take it down, and count fetches."""

    keys: list[Ed25519PrivateKey] = field(default_factory=list)
    down: bool = False
    fetches: int = 0
    url: str = ""

    async def serve(self, request: Request) -> Response:
        self.fetches += 1
        if self.down:
            return JSONResponse({"detail": "unavailable"}, status_code=503)
        return JSONResponse({"keys": [{"kty": "RSA", "n": "x", "e": "AQAB"}, *(jwk(k) for k in self.keys)]})


@pytest.fixture
async def jwks() -> AsyncIterator[JwksServer]:
    server = JwksServer(keys=[KEY])
    app = Starlette(routes=[Route("/.well-known/jwks.json", server.serve)])
    async with serve_in_background(app) as url:
        server.url = f"{url}/.well-known/jwks.json"
        yield server


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


def verifier(jwks: JwksServer, http: httpx.AsyncClient, clock: FakeClock, **options: Any) -> FalSignature:
    return FalSignature(KeySet(jwks.url, http, provider="fal", clock=clock), clock=clock, **options)


# --- the dialect --------------------------------------------------------------------


def test_a_result_from_the_docs() -> None:
    report = FalDialect().parse(RESULT)
    assert report.state is TaskState.SUCCEEDED and report.upstream_task_id == RESULT["request_id"]
    assert report.images == ({"url": "https://v3.fal.media/a.png", "content_type": "image/png", "file_name": "a.png"},)


def test_an_error_keeps_the_message_and_details() -> None:
    payload = {**RESULT, "status": "ERROR", "error": "Invalid status code: 422",
               "payload": {"detail": [{"loc": ["body", "prompt"], "msg": "field required"}]}}
    report = FalDialect().parse(payload)
    assert report.state is TaskState.FAILED and report.error is not None
    assert report.error["message"] == "Invalid status code: 422" and report.error["details"]["detail"]


def test_a_payload_error_fails_the_task() -> None:
    report = FalDialect().parse({**RESULT, "payload": None, "payload_error": "not JSON serialisable"})
    assert report.state is TaskState.FAILED and report.error is not None
    assert report.error == {"code": "upstream_payload_error", "message": "not JSON serialisable"}


def test_a_single_image_and_no_image() -> None:
    single = FalDialect().parse({**RESULT, "payload": {"image": {"url": "https://v3.fal.media/b.png"}}})
    assert [i["url"] for i in single.images] == ["https://v3.fal.media/b.png"]
    empty = FalDialect().parse({**RESULT, "payload": {"images": []}})
    assert empty.state is TaskState.FAILED and empty.error is not None and empty.error["code"] == "empty_result"


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({**RESULT, "status": "DONE"}, id="unknown-status"),
        pytest.param({**RESULT, "payload": [1]}, id="payload-a-list"),
        pytest.param({**RESULT, "payload": {"images": [{"nope": 1}]}}, id="image-without-url"),
        pytest.param({**RESULT, "request_id": {"a": 1}}, id="request-id-an-object"),
    ],
)
def test_malformed_results_are_invalid_payloads(payload: dict[str, Any]) -> None:
    with pytest.raises(InvalidPayload):
        FalDialect().parse(payload)


@pytest.mark.parametrize("status", ["OK", "ERROR"])
def test_auto_detects_fal_only(status: str) -> None:
    payload = {**RESULT, "status": status}
    assert detect(payload).name == "fal"
    assert [name for name, dialect in DIALECTS.items() if dialect.detect(payload)] == ["fal"]


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({"id": "p", "status": "succeeded", "output": ["u"], "urls": {}}, id="replicate"),
        pytest.param({"request_id": "r", "status": "OK"}, id="no-gateway-id"),
        pytest.param({"request_id": "r", "gateway_request_id": "r", "status": "COMPLETED"}, id="queue-status"),
        pytest.param({"id": "t", "status": "completed", "progress": 100, "result": {}}, id="apimart"),
    ],
)
def test_detection_needs_fals_shape(payload: dict[str, Any]) -> None:
    assert not FalDialect().detect(payload)


# --- the catalog ------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["fal-ai/flux/dev", "fal-ai/flux-pro/v1.1-ultra", "fal-ai/recraft-v3"])
def test_catalog_accepts_fal_model_ids_and_passes_parameters_through(model: str) -> None:
    request = validate({"provider": "fal", "model": model, "prompt": "p", "image_size": {"width": 512, "height": 512},
                        "num_images": 2, "enable_safety_checker": False})
    assert request.params == {"image_size": {"width": 512, "height": 512}, "num_images": 2,
                              "enable_safety_checker": False}


@pytest.mark.parametrize("model", ["flux", "fal-ai/../admin", "fal-ai//dev", "/fal-ai/flux", "fal-ai/flux?x=1",
                                   "fal-ai/flux/"])
def test_catalog_refuses_odd_fal_model_ids(model: str) -> None:
    with pytest.raises(InvalidParameters) as caught:
        validate({"provider": "fal", "model": model, "prompt": "p"})
    assert [f["field"] for f in caught.value.fields] == ["model"]


# --- submission ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_submission_goes_to_the_queue_with_the_webhook() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        return httpx.Response(200, json={"request_id": "req-1", "gateway_request_id": "req-1", "status": "IN_QUEUE"})

    task = Task(id="tsk_1", provider="fal", model="fal-ai/flux/dev", state=TaskState.QUEUED,
                request={"prompt": "a cute dog", "image_size": "square_hd", "num_images": 2},
                created_at=0, updated_at=0, expires_at=1)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        provider = FalProvider(ProviderSettings("https://queue.fal.test", Secret("fal-key")), client, timeout=5)
        callback = "https://me.example/callbacks/tok.en-_x?y"
        submission = await provider.submit(task, callback)
    assert submission.upstream_task_id == "req-1" and submission.report is None
    url = urlsplit(str(seen[0].url))
    assert (url.scheme, url.netloc, url.path) == ("https", "queue.fal.test", "/fal-ai/flux/dev")
    assert parse_qs(url.query) == {"fal_webhook": [callback]}
    assert "fal_webhook=https%3A%2F%2Fme.example" in url.query  # URL-encoded
    assert seen[0].headers["authorization"] == "Key fal-key"
    assert orjson.loads(seen[0].content) == {"prompt": "a cute dog", "image_size": "square_hd", "num_images": 2}


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("response", "code"),
    [
        pytest.param(httpx.Response(401, json={"detail": "No user found for Key ID and Secret"}),
                     "upstream_unauthorized", id="401"),
        pytest.param(httpx.Response(422, json={"detail": [{"msg": "field required"}]}), "upstream_error", id="422"),
        pytest.param(httpx.Response(200, json={"status": "IN_QUEUE"}), "upstream_garbled", id="no-request-id"),
    ],
)
async def test_fal_refusals(response: httpx.Response, code: str) -> None:
    task = Task(id="tsk_1", provider="fal", model="fal-ai/flux/dev", state=TaskState.QUEUED,
                request={"prompt": "p"}, created_at=0, updated_at=0, expires_at=1)
    async with httpx.AsyncClient(transport=httpx.MockTransport(lambda request: response)) as client:
        provider = FalProvider(ProviderSettings("https://queue.fal.test"), client, timeout=5)
        with pytest.raises(ProviderError) as caught:
            await provider.submit(task, "https://me.example/callbacks/t")
    assert caught.value.code == code


# --- the signature and the key set ------------------------------------------------------

@pytest.mark.anyio
async def test_a_valid_signature_verifies_and_the_keys_are_cached(jwks: JwksServer, http) -> None:
    clock = FakeClock(NOW)
    check = verifier(jwks, http, clock)
    for _ in range(3):
        await check.verify(BODY, signed(BODY, jwks.keys[0]))
    assert jwks.fetches == 1


@pytest.mark.anyio
async def test_the_cache_is_refreshed_after_its_max_age(jwks: JwksServer, http) -> None:
    clock = FakeClock(NOW)
    check = verifier(jwks, http, clock)
    await check.verify(BODY, signed(BODY, jwks.keys[0]))
    clock.advance(3601)
    await check.verify(BODY, signed(BODY, jwks.keys[0], timestamp=int(clock())))
    assert jwks.fetches == 2


def _forgeries(key: Ed25519PrivateKey) -> list[Any]:
    good = signed(BODY, key)
    return [
        pytest.param(BODY.replace(b"a.png", b"evil.png"), good, "mismatch", id="tampered-body"),
        pytest.param(BODY, signed(BODY, key, timestamp=NOW - 301), "stale_timestamp", id="stale"),
        pytest.param(BODY, signed(BODY, key, timestamp=NOW + 301), "future_timestamp", id="future"),
        pytest.param(BODY, {**good, "x-fal-webhook-request-id": "other"}, "mismatch", id="other-request-id"),
        pytest.param(BODY, {**good, "x-fal-webhook-user-id": "someone"}, "mismatch", id="other-user"),
        pytest.param(BODY, {**good, "x-fal-webhook-timestamp": str(NOW + 1)}, "mismatch", id="other-timestamp"),
        pytest.param(BODY, {**good, "x-fal-webhook-signature": "zz" * 64}, "malformed_signature", id="not-hex"),
        pytest.param(BODY, {**good, "x-fal-webhook-signature": "ab" * 10}, "malformed_signature", id="too-short"),
        pytest.param(BODY, {**good, "x-fal-webhook-timestamp": "soon"}, "malformed_timestamp", id="timestamp-word"),
        pytest.param(BODY, {k: v for k, v in good.items() if not k.endswith("signature")}, "missing_headers",
                     id="no-signature"),
        pytest.param(BODY, {}, "missing_headers", id="no-headers"),
    ]


@pytest.mark.anyio
@pytest.mark.parametrize(("body", "headers", "reason"), _forgeries(KEY))
async def test_forgeries_are_refused(jwks: JwksServer, http, body: bytes, headers: dict[str, str], reason: str
                                     ) -> None:
    clock = FakeClock(NOW)
    with pytest.raises(InvalidProviderSignature) as caught:
        await verifier(jwks, http, clock).verify(body, headers)
    assert caught.value.reason == reason


@pytest.mark.anyio
async def test_an_unknown_key_is_refetched_once_then_refused(jwks: JwksServer, http) -> None:
    clock = FakeClock(NOW)
    check = verifier(jwks, http, clock)
    await check.verify(BODY, signed(BODY, KEY))
    clock.advance(MIN_INTERVAL)
    stranger = Ed25519PrivateKey.generate()
    with pytest.raises(InvalidProviderSignature) as caught:
        await check.verify(BODY, signed(BODY, stranger, timestamp=int(clock())))
    assert caught.value.reason == "mismatch"
    assert jwks.fetches == 2  # the first fetch, then one more in case fal had rotated, then refused
    with pytest.raises(InvalidProviderSignature):
        await check.verify(BODY, signed(BODY, stranger, timestamp=int(clock())))
    assert jwks.fetches == 2  # and not again so soon


@pytest.mark.anyio
async def test_key_rotation_is_accepted_after_one_refetch(jwks: JwksServer, http) -> None:
    clock = FakeClock(NOW)
    check = verifier(jwks, http, clock)
    await check.verify(BODY, signed(BODY, jwks.keys[0]))
    rotated = Ed25519PrivateKey.generate()
    jwks.keys = [rotated]  # fal publishes a new key and retires the old one
    clock.advance(MIN_INTERVAL)
    await check.verify(BODY, signed(BODY, rotated, timestamp=int(clock())))
    assert jwks.fetches == 2
    await check.verify(BODY, signed(BODY, rotated, timestamp=int(clock())))
    assert jwks.fetches == 2  # cached from now on


@pytest.mark.anyio
async def test_refetches_are_rate_limited(jwks: JwksServer, http) -> None:
    clock = FakeClock(NOW)
    check = verifier(jwks, http, clock)
    await check.verify(BODY, signed(BODY, jwks.keys[0]))
    stranger = Ed25519PrivateKey.generate()
    forged = signed(BODY, stranger)

    async def attempt() -> str:
        try:
            await check.verify(BODY, forged)
        except InvalidProviderSignature as exc:
            return exc.reason
        return "accepted"

    # A flood right after the first fetch: no refetch at all (the last fetch is too recent).
    assert set(await asyncio.gather(*(attempt() for _ in range(50)))) == {"mismatch"}
    assert jwks.fetches == 1
    # Once the interval has passed, a flood causes exactly one more fetch.
    clock.advance(MIN_INTERVAL)
    assert set(await asyncio.gather(*(attempt() for _ in range(50)))) == {"mismatch"}
    assert jwks.fetches == 2


@pytest.mark.anyio
async def test_a_key_set_that_is_down_with_nothing_cached_is_unavailable(jwks: JwksServer, http) -> None:
    clock = FakeClock(NOW)
    jwks.down = True
    check = verifier(jwks, http, clock)
    with pytest.raises(SignatureKeysUnavailable) as caught:
        await check.verify(BODY, signed(BODY, jwks.keys[0]))
    assert caught.value.status_code == 503 and caught.value.headers == {"Retry-After": str(int(MIN_INTERVAL))}
    with pytest.raises(SignatureKeysUnavailable):  # not fetched again within the interval
        await check.verify(BODY, signed(BODY, jwks.keys[0]))
    assert jwks.fetches == 1
    jwks.down = False
    clock.advance(MIN_INTERVAL)
    await check.verify(BODY, signed(BODY, jwks.keys[0], timestamp=int(clock())))


@pytest.mark.anyio
async def test_a_key_set_that_goes_down_keeps_the_cached_keys(jwks: JwksServer, http) -> None:
    clock = FakeClock(NOW)
    check = verifier(jwks, http, clock)
    await check.verify(BODY, signed(BODY, jwks.keys[0]))
    jwks.down = True
    clock.advance(7200)  # past the max age: a refresh is tried, fails, and the old keys stay
    await check.verify(BODY, signed(BODY, jwks.keys[0], timestamp=int(clock())))
    assert jwks.fetches == 2


@pytest.mark.anyio
async def test_an_unreachable_key_host_is_unavailable(http) -> None:
    clock = FakeClock(NOW)
    keys = KeySet("http://127.0.0.1:9/jwks.json", http, provider="fal", clock=clock, timeout=2)
    with pytest.raises(SignatureKeysUnavailable):
        await FalSignature(keys, clock=clock).verify(BODY, signed(BODY, Ed25519PrivateKey.generate()))


@pytest.mark.anyio
async def test_only_the_configured_accounts_are_accepted(jwks: JwksServer, http) -> None:
    clock = FakeClock(NOW)
    check = verifier(jwks, http, clock, user_ids=[USER])
    await check.verify(BODY, signed(BODY, jwks.keys[0]))
    with pytest.raises(InvalidProviderSignature) as caught:
        await check.verify(BODY, signed(BODY, jwks.keys[0], user_id="someone-else"))
    assert caught.value.reason == "unknown_user"


# --- through the receiver ---------------------------------------------------------------------


async def _mint(running, provider: str = "fal") -> tuple[dict[str, Any], str]:
    minted = (await running.api.post("/v1/callback-urls", json={"provider": provider})).json()
    return minted["task"], minted["callback_url"]


@pytest.mark.anyio
async def test_a_signed_callback_is_accepted(tmp_path: Path, jwks: JwksServer) -> None:
    async with start_receiver(tmp_path, clock=FakeClock(NOW), fal_jwks_url=jwks.url) as running:
        task, url = await _mint(running)
        answer = await running.post_callback(url, content=BODY, headers=signed(BODY, jwks.keys[0]))
        assert answer.status_code == 200, answer.text
        done = (await running.api.get(f"/v1/tasks/{task['id']}")).json()
        assert done["state"] == "succeeded" and done["upstream_task_id"] == RESULT["request_id"]
        logged = (await running.api.get(f"/v1/tasks/{task['id']}/callbacks")).json()["data"]
        assert [c["provider_signature"] for c in logged] == ["verified"]
        assert logged[0]["headers"]["x-fal-webhook-user-id"] == USER


@pytest.mark.anyio
@pytest.mark.parametrize("provider", ["fal", "auto"])
async def test_a_leaked_url_cannot_forge_a_result(tmp_path: Path, jwks: JwksServer, provider: str) -> None:
    async with start_receiver(tmp_path, clock=FakeClock(NOW), fal_jwks_url=jwks.url) as running:
        task, url = await _mint(running, provider)
        for body, headers, reason in (p.values for p in _forgeries(jwks.keys[0])):
            answer = await running.post_callback(url, content=body, headers=headers)
            assert answer.status_code == 403, (reason, answer.text)
            assert answer.json()["error"]["details"] == {"provider": "fal", "reason": reason}
        assert (await running.api.get(f"/v1/tasks/{task['id']}")).json()["state"] == "submitted"
        assert (await running.api.get(f"/v1/tasks/{task['id']}/callbacks")).json()["data"] == []


@pytest.mark.anyio
async def test_a_key_set_that_is_down_answers_503_and_stores_nothing(tmp_path: Path, jwks: JwksServer) -> None:
    jwks.down = True
    async with start_receiver(tmp_path, clock=FakeClock(NOW), fal_jwks_url=jwks.url) as running:
        task, url = await _mint(running)
        answer = await running.post_callback(url, content=BODY, headers=signed(BODY, jwks.keys[0]))
        assert answer.status_code == 503 and answer.headers["retry-after"] == str(int(MIN_INTERVAL))
        assert answer.json()["error"]["code"] == "provider_keys_unavailable"
        assert (await running.api.get(f"/v1/tasks/{task['id']}/callbacks")).json()["data"] == []
        metrics = (await running.api.get("/metrics")).text
        assert 'receiver_callbacks_total{outcome="provider_keys_unavailable"} 1.0' in metrics


@pytest.mark.anyio
async def test_with_the_key_set_off_the_task_records_the_signature_was_not_checked(tmp_path: Path) -> None:
    async with start_receiver(tmp_path, clock=FakeClock(NOW), fal_jwks_url=None) as running:
        task, url = await _mint(running)
        assert (await running.post_callback(url, content=BODY)).status_code == 200
        done = (await running.api.get(f"/v1/tasks/{task['id']}")).json()
        assert done["state"] == "succeeded"
        assert len(done["warnings"]) == 1 and "RECEIVER_FAL_JWKS_URL" in done["warnings"][0]
        logged = (await running.api.get(f"/v1/tasks/{task['id']}/callbacks")).json()["data"]
        assert [c["provider_signature"] for c in logged] == ["unchecked"]
