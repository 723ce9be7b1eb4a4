"""End to end over real sockets: Replicate and fal through the receiver and the fake provider,
whose callbacks are signed as the real providers sign them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.datastructures import Secret

from receiver.config import ProviderSettings, new_webhook_secret
from receiver.fakes.provider import FakeProvider
from receiver.fakes.signed import SignedFakes
from receiver.server import serve_in_background
from tests.conftest import Running, start_receiver

pytestmark = pytest.mark.anyio

REPLICATE = {"provider": "replicate", "model": "black-forest-labs/flux-schnell", "prompt": "a lighthouse at dawn",
             "num_outputs": 1}
FAL = {"provider": "fal", "model": "fal-ai/flux/dev", "prompt": "a cute dog", "image_size": "square_hd"}


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeProvider, str]]:
    provider = FakeProvider(delay=0.05, seed=1)
    async with serve_in_background(provider.app) as url:
        yield provider, url


def signing_settings(fake: FakeProvider, url: str, *, replicate_secret: bool = True) -> dict[str, Any]:
    return {
        "provider_url": url,
        "providers": {
            "replicate": ProviderSettings(url, Secret("r8_test")),
            "fal": ProviderSettings(f"{url}/fal", Secret("fal-key-id:fal-secret")),
        },
        "replicate_webhook_secret": Secret(fake.signed.replicate_secret) if replicate_secret else None,
        "fal_jwks_url": f"{url}/.well-known/jwks.json",
    }


@pytest.fixture
async def running(tmp_path: Path, fake: tuple[FakeProvider, str]) -> AsyncIterator[Running]:
    async with start_receiver(tmp_path, **signing_settings(*fake)) as receiver:
        yield receiver


async def finished(running: Running, body: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    answer = await running.api.post("/v1/tasks", json=body)
    assert answer.status_code == 202, answer.text
    task = answer.json()
    assert task["state"] in ("submitted", "running") and task["upstream_task_id"]
    done = (await running.api.get(f"/v1/tasks/{task['id']}", params={"wait": 10})).json()
    callbacks = (await running.api.get(f"/v1/tasks/{task['id']}/callbacks")).json()["data"]
    return done, callbacks


async def test_replicate_round_trip(running: Running, fake) -> None:
    provider, url = fake
    done, callbacks = await finished(running, REPLICATE)
    assert done["state"] == "succeeded", done
    assert done["result"]["images"][0]["url"] == f"{url}/images/{done['upstream_task_id']}_0.png"
    assert done["warnings"] == []
    assert [(c["reported_state"], c["provider_signature"]) for c in callbacks] == [
        ("running", "verified"),
        ("succeeded", "verified"),
    ]
    sent = provider.requests[-1]
    assert sent["path"] == "/v1/models/black-forest-labs/flux-schnell/predictions" and sent["authorized"]
    assert sent["json"]["input"] == {"prompt": "a lighthouse at dawn", "num_outputs": 1}
    assert sent["json"]["webhook"].startswith(f"{running.settings.public_url}/callbacks/")
    assert sent["json"]["webhook_events_filter"] == ["start", "completed"]


async def test_fal_round_trip(running: Running, fake) -> None:
    provider, url = fake
    done, callbacks = await finished(running, FAL)
    assert done["state"] == "succeeded", done
    assert done["result"]["images"][0]["url"] == f"{url}/images/{done['upstream_task_id']}_0.png"
    assert [(c["reported_state"], c["provider_signature"]) for c in callbacks] == [("succeeded", "verified")]
    sent = provider.requests[-1]
    assert sent["path"] == "/fal/fal-ai/flux/dev" and sent["authorized"]
    assert sent["json"] == {"prompt": "a cute dog", "image_size": "square_hd"}
    webhook = parse_qs(sent["query"])["fal_webhook"][0]
    assert webhook.startswith(f"{running.settings.public_url}/callbacks/")


@pytest.mark.parametrize("body", [pytest.param(REPLICATE, id="replicate"), pytest.param(FAL, id="fal")])
async def test_failures_and_duplicates(running: Running, body: dict[str, Any]) -> None:
    failed, _ = await finished(running, {**body, "prompt": "[fail] x"})
    assert failed["state"] == "failed" and failed["error"]["code"] == "upstream_failed"
    twice, _ = await finished(running, {**body, "prompt": "[duplicate] x"})
    assert twice["state"] == "succeeded"
    for _ in range(250):  # the copy follows the first callback; give it up to 5 s
        callbacks = (await running.api.get(f"/v1/tasks/{twice['id']}/callbacks")).json()["data"]
        verdicts = [c["verdict"] for c in callbacks if c["reported_state"] == "succeeded"]
        if len(verdicts) == 2:
            break
        await asyncio.sleep(0.02)
    assert verdicts == ["accepted", "duplicate"]


@pytest.mark.parametrize("body", [pytest.param(REPLICATE, id="replicate"), pytest.param(FAL, id="fal")])
async def test_refusals_are_stored_as_failed_tasks(running: Running, body: dict[str, Any]) -> None:
    answer = await running.api.post("/v1/tasks", json={**body, "prompt": "[refuse:402] x"})
    assert answer.status_code == 502
    assert answer.json()["error"]["code"] == "upstream_billing" and answer.json()["task"]["state"] == "failed"


async def test_the_events_filter_reaches_replicate(running: Running, fake) -> None:
    provider, _ = fake
    done, callbacks = await finished(running, {**REPLICATE, "webhook_events_filter": ["logs", "output", "completed"]})
    assert done["state"] == "succeeded"
    assert provider.requests[-1]["json"]["webhook_events_filter"] == ["logs", "output", "completed"]
    assert [c["reported_state"] for c in callbacks] == ["running", "running", "succeeded"]


async def _silent(running: Running, provider: FakeProvider, body: dict[str, Any]) -> tuple[dict[str, Any], str]:
    answer = await running.api.post("/v1/tasks", json={**body, "prompt": "[silent] x"})
    assert answer.status_code == 202, answer.text
    sent = provider.requests[-1]
    if body["provider"] == "replicate":
        return answer.json(), sent["json"]["webhook"]
    return answer.json(), parse_qs(sent["query"])["fal_webhook"][0]


async def test_a_leaked_replicate_url_cannot_forge_a_result(running: Running, fake) -> None:
    provider, _ = fake
    task, url = await _silent(running, provider, REPLICATE)
    forged = orjson.dumps({"id": task["upstream_task_id"], "status": "succeeded", "output": ["https://evil/x.png"],
                           "urls": {}})
    impostor = SignedFakes(provider, replicate_secret=new_webhook_secret())  # signs, but with another secret
    for headers in ({}, impostor.replicate_headers(forged, "msg_1")):
        answer = await running.post_callback(url, content=forged, headers=headers)
        assert answer.status_code == 403 and answer.json()["error"]["code"] == "invalid_provider_signature"
    assert (await running.api.get(f"/v1/tasks/{task['id']}")).json()["state"] == "submitted"
    assert (await running.api.get(f"/v1/tasks/{task['id']}/callbacks")).json()["data"] == []
    # The same body, signed by the provider itself, is accepted.
    genuine = await running.post_callback(url, content=forged, headers=provider.signed.replicate_headers(forged, "m"))
    assert genuine.status_code == 200


async def test_a_leaked_fal_url_cannot_forge_a_result(running: Running, fake) -> None:
    provider, _ = fake
    task, url = await _silent(running, provider, FAL)
    forged = orjson.dumps({"request_id": task["upstream_task_id"], "gateway_request_id": task["upstream_task_id"],
                           "status": "OK", "payload": {"images": [{"url": "https://evil/x.png"}]}})
    impostor = SignedFakes(provider, fal_key=Ed25519PrivateKey.generate())  # a key fal never published
    for headers in ({}, impostor.fal_headers(forged, task["upstream_task_id"])):
        answer = await running.post_callback(url, content=forged, headers=headers)
        assert answer.status_code == 403 and answer.json()["error"]["code"] == "invalid_provider_signature"
    assert (await running.api.get(f"/v1/tasks/{task['id']}")).json()["state"] == "submitted"
    assert (await running.api.get(f"/v1/tasks/{task['id']}/callbacks")).json()["data"] == []
    genuine = await running.post_callback(url, content=forged,
                                          headers=provider.signed.fal_headers(forged, task["upstream_task_id"]))
    assert genuine.status_code == 200


async def test_without_the_replicate_secret_tasks_say_so(tmp_path: Path, fake) -> None:
    async with start_receiver(tmp_path, **signing_settings(*fake, replicate_secret=False)) as running:
        done, callbacks = await finished(running, REPLICATE)
    assert done["state"] == "succeeded"
    assert [w.split(":")[0] for w in done["warnings"]] == ["provider_signature_not_checked"]
    assert {c["provider_signature"] for c in callbacks} == {"unchecked"}


async def test_the_fake_publishes_its_key_set(fake) -> None:
    _, url = fake
    async with httpx.AsyncClient() as client:
        keys = (await client.get(f"{url}/.well-known/jwks.json")).json()["keys"]
    assert [(k["kty"], k["crv"]) for k in keys] == [("OKP", "Ed25519")] and len(keys[0]["x"]) == 43
