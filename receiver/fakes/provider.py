"""A simulated image provider, for the demo, the tests and tunnel testing without credits.

    fake = FakeProvider(delay=2.0, fail_rate=0.1, duplicate_rate=0.1)
    app = fake.app                                   # serve it anywhere

It speaks the xhuoapi dialect: it answers a submission at once with a
`task_id`, then posts the result to the request's `callback_url` after
`delay` seconds. Faults are injected at random (`fail_rate`,
`duplicate_rate`) or on demand with markers in the prompt:

    [refuse:402]   answer the submission with that HTTP error
    [fail]         post a failure callback
    [duplicate]    post the callback twice
    [silent]       never call back
    [early]        post the callback before answering the submission

Everything it receives is listed at `GET /_fake/requests` (Authorization
headers reduced to whether one was present), so a test can assert that a
request was — or was not — sent upstream.

It also plays Replicate and fal, signing their callbacks as they do
(`receiver.fakes.signed`): `replicate_secret` is the Standard Webhooks
secret (generated if not given), and fal's key set is served at
`GET /.well-known/jwks.json`.
"""

from __future__ import annotations

import asyncio
import base64
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from receiver.fakes.signed import SignedFakes
from receiver.logs import get_logger, redact_path

log = get_logger("receiver.fake_provider")

# A 1x1 PNG, served as every generated "image".
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
_REFUSE = re.compile(r"\[refuse:(\d{3})\]")


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


class FakeProvider:
    def __init__(
        self,
        *,
        delay: float = 2.0,
        fail_rate: float = 0.0,
        duplicate_rate: float = 0.0,
        seed: int | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        replicate_secret: str | None = None,
    ) -> None:
        self.delay = delay
        self.fail_rate = fail_rate
        self.duplicate_rate = duplicate_rate
        self.random = random.Random(seed)
        self.requests: list[dict[str, Any]] = []
        self.callbacks_sent: list[dict[str, Any]] = []
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self.signed = SignedFakes(self, replicate_secret=replicate_secret)
        self.app = Starlette(
            routes=[
                Route("/v1/openai/images/generations", self.xhuoapi_submit, methods=["POST"]),
                Route("/images/{name}", self.image, methods=["GET"]),
                Route("/_fake/requests", self.list_requests, methods=["GET"]),
                Route("/_fake/reset", self.reset, methods=["POST"]),
                *self.signed.routes,
            ],
            lifespan=self._lifespan,
        )

    @asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        async with httpx.AsyncClient(transport=self._transport, timeout=10.0) as client:
            self._client = client
            try:
                yield
            finally:
                for task in list(self._pending):
                    task.cancel()
                await asyncio.gather(*self._pending, return_exceptions=True)
                self._client = None

    # --- bookkeeping ------------------------------------------------------------
    async def _record(self, request: Request) -> Any:
        body = await request.body()
        try:
            parsed: Any = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            parsed = None
        entry = {
            "method": request.method,
            "path": request.url.path,
            "query": str(request.url.query),
            "authorized": "authorization" in request.headers,
            "content_type": request.headers.get("content-type"),
            "json": parsed,
            "size": len(body),
            "at": time.time(),
        }
        self.requests.append(entry)
        return parsed

    async def list_requests(self, request: Request) -> Response:
        return _json({"data": self.requests, "callbacks_sent": self.callbacks_sent})

    async def reset(self, request: Request) -> Response:
        self.requests.clear()
        self.callbacks_sent.clear()
        return _json({"ok": True})

    async def image(self, request: Request) -> Response:
        return Response(PNG, media_type="image/png", headers={"cache-control": "no-store"})

    def later(self, delay: float, action: Callable[[], Awaitable[None]]) -> None:
        """Run `action` after `delay` seconds in the background (cancelled at shutdown)."""

        async def run() -> None:
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                await action()
            except Exception as exc:
                log.warning("fake.callback_failed", error=repr(exc)[:300])

        task = asyncio.create_task(run())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def post_callback(self, url: str, body: Any, *, headers: dict[str, str] | None = None) -> int:
        """POST `body` (an object, or the exact bytes a signature covers) to `url`."""
        assert self._client is not None, "the fake provider is not running"
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        response = await self._client.post(
            url, content=raw, headers={"content-type": "application/json", **(headers or {})}
        )
        self.callbacks_sent.append({"url": redact_path(url), "status": response.status_code, "body": orjson.loads(raw)})
        log.info("fake.callback_sent", url=redact_path(url), status=response.status_code)
        return response.status_code

    def _roll(self, rate: float) -> bool:
        return rate > 0 and self.random.random() < rate

    # --- xhuoapi ----------------------------------------------------------------
    async def xhuoapi_submit(self, request: Request) -> Response:
        body = await self._record(request)
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            return _json({"success": False, "error": {"code": "bad_request", "message": "prompt is required"}}, 400)
        prompt: str = body["prompt"]
        refuse = _REFUSE.search(prompt)
        if refuse:
            status = int(refuse.group(1))
            error = {"code": f"http_{status}", "message": f"refused with {status} as the prompt asked"}
            return _json({"success": False, "error": error, "trace_id": str(uuid.uuid4())}, status)
        task_id = str(uuid.uuid4())
        callback_url = body.get("callback_url")
        if isinstance(callback_url, str) and "[silent]" not in prompt:
            failed = "[fail]" in prompt or self._roll(self.fail_rate)
            payload = self.xhuoapi_result(task_id, prompt, str(request.base_url).rstrip("/"), failed=failed)
            copies = 2 if "[duplicate]" in prompt or self._roll(self.duplicate_rate) else 1

            async def deliver() -> None:
                for _ in range(copies):
                    await self.post_callback(callback_url, payload)

            if "[early]" in prompt:
                await deliver()  # the callback lands before the submission is answered
            else:
                self.later(self.delay, deliver)
        return _json({"task_id": task_id})

    @staticmethod
    def xhuoapi_result(task_id: str, prompt: str, base_url: str, *, failed: bool) -> dict[str, Any]:
        trace = str(uuid.uuid4())
        if failed:
            error = {"code": "generation_failed", "message": "The simulated provider failed this task."}
            return {"success": False, "task_id": task_id, "error": error, "trace_id": trace}
        image = {"url": f"{base_url}/images/{task_id}_0.png", "revised_prompt": prompt}
        return {
            "success": True,
            "task_id": task_id,
            "trace_id": trace,
            "data": {"created": int(time.time()), "data": [image]},
        }
