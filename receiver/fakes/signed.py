"""The simulated Replicate and fal: providers that sign their callbacks, as the real ones do.

    fake = FakeProvider(replicate_secret="whsec_…")      # the key pair for fal is generated
    fake.signed.replicate_secret                          # RECEIVER_REPLICATE_WEBHOOK_SECRET
    # RECEIVER_REPLICATE_URL=<fake>   RECEIVER_FAL_URL=<fake>/fal
    # RECEIVER_FAL_JWKS_URL=<fake>/.well-known/jwks.json

Replicate: `POST /v1/models/{owner}/{name}/predictions` and `POST /v1/predictions`
answer `201` with a prediction, then post the prediction to `webhook` for each
event of `webhook_events_filter`, signed with Standard Webhooks headers under
`replicate_secret`. fal: `POST /fal/{model_id}?fal_webhook=…` answers
`{request_id, …}`, then posts the result signed with ED25519 under a key pair
the fake generates and publishes at `GET /.well-known/jwks.json`. The prompt
markers of the xhuoapi fake work here too: `[refuse:NNN]`, `[fail]`,
`[duplicate]`, `[silent]`, `[early]`.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from standardwebhooks import Webhook
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from receiver.config import new_webhook_secret

if TYPE_CHECKING:
    from receiver.fakes.provider import FakeProvider

_REFUSE = re.compile(r"\[refuse:(\d{3})\]")
REPLICATE_EVENTS = ("start", "output", "logs", "completed")


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def jwk(key: Ed25519PrivateKey) -> dict[str, str]:
    """The public half of `key` as a JWK (`kty` OKP, `crv` Ed25519, `x` base64url)."""
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    return {"kty": "OKP", "crv": "Ed25519", "x": x, "use": "sig", "alg": "EdDSA"}


class SignedFakes:
    """The signing providers of a FakeProvider; `routes` are mounted on its app."""

    def __init__(
        self,
        fake: FakeProvider,
        *,
        replicate_secret: str | None = None,
        fal_key: Ed25519PrivateKey | None = None,
        fal_user_id: str = "fake-fal-user",
    ) -> None:
        self.fake = fake
        self.replicate_secret = replicate_secret or new_webhook_secret()
        self.fal_key = fal_key or Ed25519PrivateKey.generate()
        self.fal_user_id = fal_user_id
        self._webhook = Webhook(self.replicate_secret)
        self.routes = [
            Route("/v1/models/{owner}/{name}/predictions", self.replicate_submit, methods=["POST"]),
            Route("/v1/predictions", self.replicate_submit, methods=["POST"]),
            Route("/fal/{model_id:path}", self.fal_submit, methods=["POST"]),
            Route("/.well-known/jwks.json", self.jwks, methods=["GET"]),
        ]

    # --- signing, as the real providers do ----------------------------------------
    def replicate_headers(self, body: bytes, msg_id: str) -> dict[str, str]:
        now = int(time.time())
        signature = self._webhook.sign(msg_id, datetime.fromtimestamp(now, UTC), body.decode())
        return {"webhook-id": msg_id, "webhook-timestamp": str(now), "webhook-signature": signature}

    def fal_headers(self, body: bytes, request_id: str) -> dict[str, str]:
        stamp = str(int(time.time()))
        message = "\n".join((request_id, self.fal_user_id, stamp, hashlib.sha256(body).hexdigest())).encode()
        return {
            "x-fal-webhook-request-id": request_id,
            "x-fal-webhook-user-id": self.fal_user_id,
            "x-fal-webhook-timestamp": stamp,
            "x-fal-webhook-signature": self.fal_key.sign(message).hex(),
        }

    async def jwks(self, request: Request) -> Response:
        return _json({"keys": [jwk(self.fal_key)]})

    # --- when and how often to call back (the prompt markers) ----------------------
    async def _dispatch(self, prompt: str, deliver: Callable[[int], Awaitable[None]]) -> None:
        """Call `deliver(copies)` now ([early]), later, or never ([silent])."""
        if "[silent]" in prompt:
            return
        copies = 2 if "[duplicate]" in prompt or self.fake._roll(self.fake.duplicate_rate) else 1
        if "[early]" in prompt:
            await deliver(copies)  # the callback lands before the submission is answered
        else:
            self.fake.later(self.fake.delay, lambda: deliver(copies))

    def _failed(self, prompt: str) -> bool:
        return "[fail]" in prompt or self.fake._roll(self.fake.fail_rate)

    # --- Replicate ------------------------------------------------------------------
    async def replicate_submit(self, request: Request) -> Response:
        body = await self.fake._record(request)
        model_input = body.get("input") if isinstance(body, dict) else None
        if not isinstance(model_input, dict) or not isinstance(model_input.get("prompt"), str):
            return _json({"title": "Invalid input", "detail": "input.prompt is required", "status": 422}, 422)
        prompt: str = model_input["prompt"]
        refuse = _REFUSE.search(prompt)
        if refuse:
            status = int(refuse.group(1))
            detail = f"refused with {status} as the prompt asked"
            return _json({"title": "Refused", "detail": detail, "status": status}, status)
        base = str(request.base_url).rstrip("/")
        prediction_id = uuid.uuid4().hex[:26]
        params = request.path_params
        model = f"{params['owner']}/{params['name']}" if "owner" in params else None
        prediction: dict[str, Any] = {
            "id": prediction_id,
            "model": model or "fake/model",
            "version": body.get("version") or "fake-version",
            "input": model_input,
            "logs": "",
            "output": None,
            "error": None,
            "status": "starting",
            "created_at": datetime.now(UTC).isoformat(),
            "urls": {
                "get": f"{base}/v1/predictions/{prediction_id}",
                "cancel": f"{base}/v1/predictions/{prediction_id}/cancel",
            },
        }
        webhook = body.get("webhook")
        if isinstance(webhook, str):
            wanted = body.get("webhook_events_filter") or list(REPLICATE_EVENTS)
            updates = self._replicate_updates(prediction, wanted, base, failed=self._failed(prompt))

            async def deliver(copies: int) -> None:
                for update in updates:
                    raw = orjson.dumps(update)
                    msg_id = "msg_" + uuid.uuid4().hex
                    for _ in range(copies if update["status"] != "processing" else 1):
                        await self.fake.post_callback(webhook, raw, headers=self.replicate_headers(raw, msg_id))

            await self._dispatch(prompt, deliver)
        return _json(prediction, 201)

    @staticmethod
    def _replicate_updates(
        prediction: dict[str, Any], wanted: list[str], base: str, *, failed: bool
    ) -> list[dict[str, Any]]:
        updates: list[dict[str, Any]] = []
        if "start" in wanted:
            updates.append({**prediction, "status": "processing", "logs": "starting\n"})
        if "logs" in wanted:
            updates.append({**prediction, "status": "processing", "logs": "starting\n50%\n"})
        image = f"{base}/images/{prediction['id']}_0.png"
        if "output" in wanted and not failed:
            updates.append({**prediction, "status": "processing", "output": [image]})
        if "completed" in wanted:
            done: dict[str, Any]
            if failed:
                done = {"status": "failed", "error": "The simulated provider failed this prediction."}
            else:
                done = {"status": "succeeded", "output": [image], "metrics": {"predict_time": 0.1}}
            updates.append({**prediction, "completed_at": datetime.now(UTC).isoformat(), **done})
        return updates

    # --- fal --------------------------------------------------------------------------
    async def fal_submit(self, request: Request) -> Response:
        body = await self.fake._record(request)
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            return _json({"detail": [{"loc": ["body", "prompt"], "msg": "field required"}]}, 422)
        prompt: str = body["prompt"]
        refuse = _REFUSE.search(prompt)
        if refuse:
            status = int(refuse.group(1))
            return _json({"detail": f"refused with {status} as the prompt asked"}, status)
        base = str(request.base_url).rstrip("/")
        model_id = request.path_params["model_id"]
        request_id = str(uuid.uuid4())
        webhook = request.query_params.get("fal_webhook")
        if webhook:
            if self._failed(prompt):
                result: dict[str, Any] = {
                    "status": "ERROR",
                    "error": "Invalid status code: 500",
                    "payload": {"detail": "The simulated provider failed this request."},
                }
            else:
                image = {
                    "url": f"{base}/images/{request_id}_0.png",
                    "content_type": "image/png",
                    "file_name": f"{request_id}_0.png",
                    "width": 1,
                    "height": 1,
                }
                result = {"status": "OK", "payload": {"images": [image], "seed": 42, "prompt": prompt}}
            raw = orjson.dumps({"request_id": request_id, "gateway_request_id": request_id, **result})

            async def deliver(copies: int) -> None:
                for _ in range(copies):
                    await self.fake.post_callback(webhook, raw, headers=self.fal_headers(raw, request_id))

            await self._dispatch(prompt, deliver)
        queue = f"{base}/fal/{model_id}/requests/{request_id}"
        return _json(
            {
                "request_id": request_id,
                "gateway_request_id": request_id,
                "status": "IN_QUEUE",
                "queue_position": 0,
                "response_url": queue,
                "status_url": f"{queue}/status",
                "cancel_url": f"{queue}/cancel",
            }
        )
