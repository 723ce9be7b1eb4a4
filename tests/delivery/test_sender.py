"""The HTTP seam, against a real endpoint on 127.0.0.1 (and the guard, with a fake resolver)."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Sequence

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from receiver.delivery.sender import RESPONSE_BODY_LIMIT, AiohttpSender
from receiver.delivery.urlguard import UrlGuard
from receiver.fakes.subscriber import FakeSubscriber
from receiver.server import free_port, serve_in_background

pytestmark = pytest.mark.anyio

BODY = b'{"type":"ping","timestamp":"2026-11-21T08:00:00.000Z","data":{}}'


@pytest.fixture
async def sink() -> AsyncIterator[tuple[FakeSubscriber, str]]:
    fake = FakeSubscriber()
    async with serve_in_background(fake.app) as url:
        yield fake, url
        fake.release()


@pytest.fixture
async def sender() -> AsyncIterator[AiohttpSender]:
    sending = AiohttpSender()
    yield sending
    await sending.aclose()


async def test_a_2xx_is_ok_and_the_body_is_kept(sink, sender) -> None:
    fake, url = sink
    answer = await sender.send(f"{url}/hook", BODY, {"content-type": "application/json"}, timeout=5)
    assert answer.ok and answer.status_code == 200 and answer.body == '{"ok":true}' and answer.error is None
    assert answer.latency_ms > 0
    assert fake.received[0].body == BODY and fake.received[0].headers["user-agent"].startswith("receiver-webhooks/")


async def test_only_the_first_kib_of_an_answer_is_kept(sender) -> None:
    async def big(request: Request) -> Response:
        return Response(b"x" * 50_000, 503, headers={"retry-after": "7"})

    async with serve_in_background(Starlette(routes=[Route("/", big, methods=["POST"])])) as url:
        answer = await sender.send(url + "/", BODY, {}, timeout=5)
    assert not answer.ok and answer.status_code == 503 and answer.error == "HTTP 503"
    assert answer.body == "x" * RESPONSE_BODY_LIMIT and answer.retry_after == "7"


async def test_redirects_are_not_followed(sink, sender) -> None:
    fake, url = sink
    fake.mode = "redirect"
    answer = await sender.send(f"{url}/hook", BODY, {}, timeout=5)
    assert not answer.ok and answer.status_code == 307 and "redirect" in (answer.error or "")
    assert [r.path for r in fake.received] == ["/hook"]


async def test_a_hanging_endpoint_times_out(sink, sender) -> None:
    fake, url = sink
    fake.mode = "hang"
    started = time.monotonic()
    answer = await sender.send(f"{url}/hook", BODY, {}, timeout=0.3)
    assert not answer.ok and answer.status_code is None and "timeout" in (answer.error or "")
    assert time.monotonic() - started < 5


async def test_a_closed_port_is_a_connection_error(sender) -> None:
    answer = await sender.send(f"http://127.0.0.1:{free_port()}/hook", BODY, {}, timeout=5)
    assert not answer.ok and answer.status_code is None and "connection failed" in (answer.error or "")


class FakeDNS:
    def __init__(self, records: dict[str, Sequence[str]]) -> None:
        self.records = records
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.lookups.append(host)
        if host not in self.records:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.records[host]


async def test_the_guard_refuses_at_connect_time_after_a_dns_rebind(sink) -> None:
    fake, url = sink
    port = url.rsplit(":", 1)[1]
    dns = FakeDNS({"hooks.example.com": ["93.184.216.34"]})
    guard = UrlGuard(resolver=dns)
    await guard.check(f"http://hooks.example.com:{port}/hook")  # accepted when created
    dns.records["hooks.example.com"] = ["127.0.0.1"]  # then the name is pointed at the receiver's host
    sender = AiohttpSender(guard=guard)
    try:
        answer = await sender.send(f"http://hooks.example.com:{port}/hook", BODY, {}, timeout=5)
        literal = await sender.send(f"{url}/hook", BODY, {}, timeout=5)
        missing = await sender.send(f"http://gone.example.com:{port}/hook", BODY, {}, timeout=5)
    finally:
        await sender.aclose()
    assert not answer.ok and (answer.error or "").startswith("url_not_allowed") and "loopback" in answer.error
    assert not literal.ok and (literal.error or "").startswith("url_not_allowed")
    assert not missing.ok and "cannot resolve" in (missing.error or "")
    assert fake.received == []  # nothing ever reached the endpoint


class CountingGuard(UrlGuard):
    """Lets loopback through, to show the sender connects to the address the guard returned."""

    def __init__(self, address: str) -> None:
        super().__init__()
        self.address = address
        self.lookups: list[tuple[str, int]] = []

    async def addresses(self, host: str, port: int) -> list[str]:
        self.lookups.append((host, port))
        return [self.address]


async def test_the_sender_connects_to_the_checked_address_with_the_original_host(sink) -> None:
    fake, url = sink
    port = int(url.rsplit(":", 1)[1])
    guard = CountingGuard("127.0.0.1")
    sender = AiohttpSender(guard=guard)
    try:
        for _ in range(3):
            answer = await sender.send(f"http://hooks.example.com:{port}/hook", BODY, {}, timeout=5)
            assert answer.ok, answer
    finally:
        await sender.aclose()
    assert [r.headers["host"] for r in fake.received] == [f"hooks.example.com:{port}"] * 3
    assert guard.lookups == [("hooks.example.com", port)]  # one connection, kept alive and reused
