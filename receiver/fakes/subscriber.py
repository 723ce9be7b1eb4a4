"""A subscriber's webhook endpoint, for the demo and the tests.

    sink = FakeSubscriber(secrets=["whsec_…"])
    async with serve_in_background(sink.app) as url:        # POST {url}/anything
        ...
        await sink.wait_for(lambda got: len(got) >= 2)
        sink.mode = "fail"                                   # or "ok", "hang", "gone", "redirect"

Every delivery is verified with the `standardwebhooks` library against the
configured secrets (any one may match) and recorded, verified or not. A
delivery whose signature does not verify is answered 401, as a real subscriber
would. Otherwise the answer follows `mode` — or `script`, which may pick a
status per delivery (None: follow `mode`):

    ok        200
    fail      `fail_status` (500), with `Retry-After: retry_after` if that is set
    hang      no answer until the sender gives up (or `release()`)
    gone      410 Gone
    redirect  307 to /moved (which must never be followed)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


@dataclass
class Received:
    """One request as the endpoint saw it."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    verified: bool
    error: str | None = None
    status: int | None = None  # what the endpoint answered (None: no answer yet, or never)

    @property
    def event(self) -> dict[str, Any]:
        value: Any = orjson.loads(self.body) if self.body else {}
        return value if isinstance(value, dict) else {}

    @property
    def webhook_id(self) -> str:
        return self.headers.get("webhook-id", "")

    @property
    def type(self) -> str:
        return str(self.event.get("type", ""))

    @property
    def task_id(self) -> str | None:
        data = self.event.get("data") or {}
        return data.get("id") if self.type.startswith("task.") else None

    @property
    def sequence(self) -> int | None:
        data = self.event.get("data") or {}
        return data.get("sequence") if self.type.startswith("task.") else None


@dataclass
class FakeSubscriber:
    secrets: Sequence[str] = ()
    mode: str = "ok"
    fail_status: int = 500
    retry_after: str | None = None
    script: Callable[[Received], int | None] | None = None
    received: list[Received] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    def __post_init__(self) -> None:
        self._changed = asyncio.Condition()
        self._released = asyncio.Event()
        self.app = Starlette(
            routes=[
                Route("/moved", self.moved, methods=["POST"]),
                Route("/{path:path}", self.hook, methods=["POST"]),
            ]
        )

    @property
    def verified(self) -> list[Received]:
        """Deliveries that verified and were answered 2xx."""
        return [r for r in self.received if r.verified and r.status is not None and 200 <= r.status < 300]

    def verify(self, body: bytes, headers: dict[str, str]) -> str | None:
        """None if one of the secrets verifies the delivery, else why not."""
        if not self.secrets:
            return "no secret configured"
        error = "no secret verified the signature"
        for secret in self.secrets:
            try:
                Webhook(secret).verify(body, headers)
            except WebhookVerificationError as exc:
                error = str(exc)
            else:
                return None
        return error

    async def hook(self, request: Request) -> Response:
        body = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        problem = self.verify(body, headers)
        got = Received(request.url.path, headers, body, time.time(), problem is None, problem)
        self.received.append(got)
        async with self._changed:
            self._changed.notify_all()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            response = await self._answer(request, got)
        finally:
            self.in_flight -= 1
        got.status = response.status_code if response is not None else None
        async with self._changed:
            self._changed.notify_all()
        return response or Response(status_code=504)

    async def _answer(self, request: Request, got: Received) -> Response | None:
        if not got.verified and self.secrets:
            return Response(b'{"error":"bad signature"}', 401, media_type="application/json")
        status = self.script(got) if self.script is not None else None
        mode = self.mode if status is None else "status"
        if mode == "hang":
            while not await request.is_disconnected():  # the sender gave up: stop hanging
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._released.wait(), 0.02)
                if self._released.is_set():
                    break
            return None
        if mode == "gone":
            return Response(b"gone", 410)
        if mode == "redirect":
            return Response(status_code=307, headers={"location": "/moved"})
        if mode == "fail":
            headers = {"retry-after": self.retry_after} if self.retry_after else None
            return Response(b'{"error":"down for maintenance"}', self.fail_status, headers=headers)
        if mode == "status" and status is not None:
            return Response(b"scripted", status)
        return Response(b'{"ok":true}', 200, media_type="application/json")

    async def moved(self, request: Request) -> Response:
        """Where `redirect` points: anything recorded here means a redirect was followed."""
        body = await request.body()
        self.received.append(Received(request.url.path, dict(request.headers), body, time.time(), False))
        return Response(b"followed", 200)

    def release(self) -> None:
        """End every hanging request (and any later one)."""
        self._released.set()

    async def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float = 10.0) -> list[Received]:
        """Wait until `predicate(received)` holds; TimeoutError after `timeout` seconds."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self.received))
        return self.received
