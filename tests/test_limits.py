"""Limits, on real sockets: body and head sizes, slow clients, long-lived requests per key, callbacks per task."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from receiver.fakes.provider import FakeProvider
from tests.conftest import API_KEY, Running, start_receiver
from tests.delivery.helpers import eventually, new_task

pytestmark = pytest.mark.anyio


class Raw:
    """One raw TCP connection to a receiver: write bytes as a client would, read what comes back."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter

    async def __aenter__(self) -> Raw:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.writer.close()

    async def send(self, data: bytes) -> bool:
        """Write `data`; False once the server has closed its end (the write is refused)."""
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, OSError):
            return False
        return True

    async def answer(self, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
        """The status, headers and body of the next response (read up to its content-length)."""
        async with asyncio.timeout(timeout):
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, body

    async def closed(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection within `timeout` (what is left unread is dropped)."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            return False
        except ConnectionError:
            pass
        return True


def head(method: str, path: str, *extra: str, host: str = "127.0.0.1") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}", *extra, "", ""]
    return "\r\n".join(lines).encode("latin-1")


def error_code(body: bytes) -> str:
    code: str = orjson.loads(body)["error"]["code"]
    return code


@pytest.fixture
async def limited(tmp_path: Path, fake_provider: tuple[FakeProvider, str], request: pytest.FixtureRequest) -> Any:
    overrides = getattr(request, "param", {})
    async with start_receiver(tmp_path, provider_url=fake_provider[1], **overrides) as running:
        yield running


# --- body size ------------------------------------------------------------------------------------


async def test_a_declared_huge_body_is_refused_before_it_is_read(running: Running) -> None:
    task, callback_url = await new_task(running)
    path = urlsplit(callback_url).path
    for target, auth in ((path, ()), ("/v1/tasks", (f"authorization: Bearer {API_KEY}",))):
        async with Raw(running.url) as raw:
            # 100 MiB announced, 1 KiB sent: the answer comes without the rest.
            await raw.send(head("POST", target, "content-type: application/json", "content-length: 104857600", *auth))
            await raw.send(b"{" + b" " * 1023)
            status, _, body = await raw.answer()
            assert status == 413, body
            assert error_code(body) == "payload_too_large"
            # What still comes is dropped for a moment (a lingering close), then the connection closes.
            sent_until_closed = 0
            started = time.monotonic()
            while time.monotonic() - started < 6 and await raw.send(b" " * 65536):
                sent_until_closed += 65536
                await asyncio.sleep(0.01)
            assert await raw.closed(timeout=1)
            assert time.monotonic() - started < 4
            assert sent_until_closed < 100 * 1024 * 1024
    assert (await running.api.get(f"/v1/tasks/{task['id']}/callbacks")).json()["data"] == []


@pytest.mark.parametrize("limited", [{"max_body_bytes": 65536}], indirect=True)
async def test_a_chunked_body_is_cut_off_as_it_passes_the_limit(limited: Running) -> None:
    task, callback_url = await new_task(limited)
    async with Raw(limited.url) as raw:
        await raw.send(
            head("POST", urlsplit(callback_url).path, "content-type: application/json", "transfer-encoding: chunked")
        )
        chunk = b"x" * 8192
        for _ in range(9):  # 72 KiB, more than the limit, and never the final chunk
            await raw.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        status, _, body = await raw.answer()
        assert status == 413 and error_code(body) == "payload_too_large"
        assert await raw.closed()
    # Within the limit, chunked is fine.
    async with Raw(limited.url) as raw:
        payload = orjson.dumps(
            {"success": True, "task_id": "up-1", "data": {"data": [{"url": "https://cdn.example/a.png"}]}}
        )
        await raw.send(
            head("POST", urlsplit(callback_url).path, "content-type: application/json", "transfer-encoding: chunked")
        )
        await raw.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload))
        status, _, body = await raw.answer()
        assert status == 200, body
    assert len((await limited.api.get(f"/v1/tasks/{task['id']}/callbacks")).json()["data"]) == 1


# --- head size ------------------------------------------------------------------------------------


@pytest.mark.parametrize("limited", [{"max_header_bytes": 8192}], indirect=True)
async def test_a_head_larger_than_the_limit_is_refused_with_431(limited: Running) -> None:
    big = "x-padding: " + "a" * 9000
    # In one piece (httptools would take a complete head of any size) and trickled in pieces.
    for pieces in (1, 10):
        data = head("GET", "/healthz", big)
        async with Raw(limited.url) as raw:
            step = len(data) // pieces + 1
            for start in range(0, len(data), step):
                if not await raw.send(data[start : start + step]):
                    break
                await asyncio.sleep(0.005)
            status, headers, body = await raw.answer()
            assert status == 431, (pieces, body)
            assert error_code(body) == "request_header_fields_too_large"
            assert headers["connection"] == "close"
            assert await raw.closed()
    # A head just under the limit is served.
    async with Raw(limited.url) as raw:
        await raw.send(head("GET", "/healthz", "x-padding: " + "a" * 7000))
        status, _, _ = await raw.answer()
        assert status == 200


# --- slow clients ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage", [b"NOT HTTP AT ALL\r\n\r\n", b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-bad\x00: 1\r\n\r\n"]
)
async def test_a_request_the_parser_cannot_read_gets_the_error_shape(limited: Running, garbage: bytes) -> None:
    async with Raw(limited.url) as raw:
        await raw.send(garbage)
        status, _, body = await raw.answer()
        assert status == 400 and error_code(body) == "invalid_request", body
        assert await raw.closed()


@pytest.mark.parametrize("limited", [{"header_timeout": 0.5, "keep_alive_timeout": 0.3}], indirect=True)
async def test_a_client_that_trickles_its_head_or_sends_nothing_is_cut_off(limited: Running) -> None:
    async with Raw(limited.url) as raw:
        started = time.monotonic()
        data = head("GET", "/healthz", "x-slow: " + "s" * 100)
        status = None
        for byte in data[:-2]:  # a byte every 20 ms: the head would take ~3 s
            if not await raw.send(bytes([byte])):
                break
            await asyncio.sleep(0.02)
            if raw.reader.at_eof() or raw.reader._buffer:
                break
        status, _, body = await raw.answer()
        assert status == 408 and error_code(body) == "request_timeout"
        assert await raw.closed()
        assert time.monotonic() - started < 1.5
    async with Raw(limited.url) as raw:  # connects and says nothing: closed without an answer
        started = time.monotonic()
        assert await raw.closed(timeout=3)
        assert 0.4 < time.monotonic() - started < 1.5
    async with Raw(limited.url) as raw:  # an idle keep-alive connection: closed after its timeout
        await raw.send(head("GET", "/healthz"))
        assert (await raw.answer())[0] == 200
        started = time.monotonic()
        assert await raw.closed(timeout=3)
        assert time.monotonic() - started < 0.45  # the keep-alive timeout, not the head's
    async with Raw(limited.url) as raw:  # a prompt client keeps its connection across requests
        for _ in range(3):
            await raw.send(head("GET", "/healthz"))
            assert (await raw.answer())[0] == 200
            await asyncio.sleep(0.1)


@pytest.mark.parametrize("limited", [{"header_timeout": 0.3, "keep_alive_timeout": 1.0}], indirect=True)
async def test_a_keep_alive_longer_than_the_head_deadline_is_kept(limited: Running) -> None:
    """The head deadline runs from the head's first byte, not from the last response: an idle
    connection lives RECEIVER_KEEP_ALIVE_TIMEOUT (a load balancer's pool relies on it)."""
    async with Raw(limited.url) as raw:
        await raw.send(head("GET", "/healthz"))
        assert (await raw.answer())[0] == 200
        await asyncio.sleep(0.6)  # twice the head deadline, within the keep-alive
        assert await raw.send(head("GET", "/healthz"))
        assert (await raw.answer())[0] == 200
        started = time.monotonic()
        assert await raw.closed(timeout=3)
        assert 0.8 < time.monotonic() - started < 1.6  # then the keep-alive timeout closes it
    async with Raw(limited.url) as raw:  # a head trickled after a response still has its deadline
        await raw.send(head("GET", "/healthz"))
        assert (await raw.answer())[0] == 200
        await raw.send(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        status, _, body = await raw.answer()
        assert status == 408 and error_code(body) == "request_timeout"


@pytest.mark.parametrize("limited", [{"body_timeout": 0.5}], indirect=True)
async def test_a_client_that_trickles_its_body_is_cut_off(limited: Running) -> None:
    task, callback_url = await new_task(limited)
    async with Raw(limited.url) as raw:
        started = time.monotonic()
        await raw.send(
            head("POST", urlsplit(callback_url).path, "content-type: application/json", "content-length: 200")
        )
        for _ in range(40):  # a byte every 50 ms: 200 bytes would take 10 s
            if not await raw.send(b" ") or raw.reader._buffer:
                break
            await asyncio.sleep(0.05)
        status, headers, body = await raw.answer()
        assert status == 408 and error_code(body) == "request_timeout"
        assert headers.get("connection") == "close"
        assert time.monotonic() - started < 1.5
        assert await raw.closed()
    assert (await limited.api.get(f"/v1/tasks/{task['id']}/callbacks")).json()["data"] == []
    metrics = (await limited.api.get("/metrics")).text  # counted as the refusal it is
    assert 'receiver_callbacks_total{outcome="request_timeout"} 1.0' in metrics


async def _responses(raw: Raw, count: int, timeout: float = 5.0) -> list[tuple[int, float]]:
    """The next `count` answers on `raw`: (status, seconds after the call) each."""
    started, got = time.monotonic(), []
    for _ in range(count):
        status, _, _ = await raw.answer(timeout)
        got.append((status, time.monotonic() - started))
    return got


@pytest.mark.parametrize("limited", [{"body_timeout": 0.5}], indirect=True)
async def test_a_pipelined_body_gets_its_deadline_when_its_turn_comes(limited: Running) -> None:
    """A request queued behind a slower one is not read meanwhile: its body's deadline starts when
    it does, and neither its deadline nor a lingering close cuts off the answer ahead of it."""
    waiting, _ = await new_task(limited)
    task, callback_url = await new_task(limited)
    body = orjson.dumps({"success": True, "task_id": "up-1", "data": {"data": [{"url": "https://cdn.example/a.png"}]}})
    path = urlsplit(callback_url).path
    callback = head("POST", path, "content-type: application/json", f"content-length: {len(body)}")
    async with Raw(limited.url) as raw:  # a long-poll of 1 s (past the deadline), the callback's head behind it
        await raw.send(head("GET", f"/v1/tasks/{waiting['id']}?wait=1", f"authorization: Bearer {API_KEY}") + callback)
        await asyncio.sleep(0.05)
        await raw.send(body)
        [(polled, _), (taken, after)] = await _responses(raw, 2)
        assert (polled, taken) == (200, 200) and after >= 0.9
    assert len((await limited.api.get(f"/v1/tasks/{task['id']}/callbacks")).json()["data"]) == 1

    async with Raw(limited.url) as raw:  # answered at once, then a callback whose body never ends
        await raw.send(head("GET", "/healthz") + callback + body[:10])
        [(healthy, _), (cut_off, after)] = await _responses(raw, 2)
        assert (healthy, cut_off) == (200, 408) and 0.4 < after < 1.5
        assert await raw.closed()


@pytest.mark.parametrize("limited", [{"body_timeout": 0.5}], indirect=True)
async def test_a_body_sent_after_its_head_in_time_is_taken_and_the_deadline_ends_with_it(limited: Running) -> None:
    task, callback_url = await new_task(limited)
    body = orjson.dumps({"success": True, "task_id": "up-1", "data": {"data": [{"url": "https://cdn.example/a.png"}]}})
    path = urlsplit(callback_url).path
    async with Raw(limited.url) as raw:
        await raw.send(head("POST", path, "content-type: application/json", f"content-length: {len(body)}"))
        await asyncio.sleep(0.2)  # the head alone: the body's deadline runs
        await raw.send(body)
        status, _, answer = await raw.answer()
        assert status == 200, answer
        await asyncio.sleep(0.8)  # past the body deadline, idle on a kept-alive connection: nothing fires
        await raw.send(head("GET", "/healthz"))
        status, headers, _ = await raw.answer()
        assert status == 200 and headers.get("connection") != "close"
    assert len((await limited.api.get(f"/v1/tasks/{task['id']}/callbacks")).json()["data"]) == 1


async def test_a_client_that_hangs_up_mid_body_is_no_crash(limited: Running, logs: Any) -> None:
    """Providers time out and hang up: the half-sent callback is dropped, quietly, nothing stored."""
    task, callback_url = await new_task(limited)
    async with Raw(limited.url) as raw:
        await raw.send(
            head("POST", urlsplit(callback_url).path, "content-type: application/json", "content-length: 200")
            + b'{"success": true'
        )
        await asyncio.sleep(0.5)  # the head is read and the route waits for the rest of the body
    await eventually(lambda: _heard(logs, "http.client_disconnected"))
    assert not logs.events("request.crashed")
    assert (await limited.api.get(f"/v1/tasks/{task['id']}/callbacks")).json()["data"] == []


async def _heard(logs: Any, event: str) -> bool:
    return bool(logs.events(event))


# --- long-lived requests per key ------------------------------------------------------------------


@pytest.mark.parametrize("limited", [{"max_streams_per_key": 2}], indirect=True)
async def test_long_polls_and_streams_are_capped_per_key(limited: Running) -> None:
    quotas = limited.app.state.quotas.streams
    first, _ = await new_task(limited)
    second, _ = await new_task(limited)
    poll = asyncio.create_task(limited.api.get(f"/v1/tasks/{first['id']}", params={"wait": 30}))
    async with limited.api.stream("GET", f"/v1/tasks/{second['id']}/events") as events:
        assert events.status_code == 200
        await eventually(lambda: _async_true(sum(quotas._held.values()) >= 2))
        for refused in (
            await limited.api.get(f"/v1/tasks/{second['id']}", params={"wait": 5}),
            await limited.api.get(f"/v1/tasks/{first['id']}/events"),
            await limited.api.get("/v1/stream"),
        ):
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["code"] == "too_many_streams"
            assert refused.json()["error"]["details"] == {"limit": 2}
            assert refused.headers["retry-after"] == "5"
        # A read without `wait` is not a long-lived request: never refused.
        assert (await limited.api.get(f"/v1/tasks/{first['id']}")).status_code == 200
    # The stream's slot is given back when it ends; the long-poll still holds one.
    await eventually(lambda: _async_true(sum(quotas._held.values()) == 1))
    again = asyncio.create_task(limited.api.get(f"/v1/tasks/{second['id']}", params={"wait": 0.2}))
    assert (await again).status_code == 200
    poll.cancel()
    with pytest.raises(asyncio.CancelledError):
        await poll
    await eventually(lambda: _async_true(not quotas._held))


async def _async_true(value: bool) -> bool:
    return value


# --- callbacks per task ---------------------------------------------------------------------------


@pytest.mark.parametrize("database", ["sqlite", "postgres"], indirect=True)
async def test_a_task_keeps_at_most_so_many_callbacks(
    tmp_path: Path, fake_provider: Any, database_url: str, logs: Any
) -> None:
    async with start_receiver(
        tmp_path, provider_url=fake_provider[1], database_url=database_url, max_callbacks_per_task=3
    ) as running:
        task, callback_url = await new_task(running)
        bodies = [
            {"success": True, "task_id": "up-1", "data": {"data": [{"url": f"https://cdn.example/{n}.png"}]}}
            for n in range(3)
        ]
        for body in bodies:  # a success, then two conflicting ones: all logged
            assert (await running.post_callback(callback_url, body)).status_code == 200
        # Past the cap a callback is still answered as the contract says, but not kept.
        late = await running.post_callback(callback_url, {**bodies[0], "trace_id": "new"})  # a fourth
        assert late.status_code == 200 and late.json()["ignored"] is True, late.text
        assert logs.events("callback.not_logged")[0]["limit"] == 3
        repeat = await running.post_callback(callback_url, bodies[0])  # a repeat of a stored one: a duplicate
        assert repeat.status_code == 200 and repeat.json()["duplicate"] is True, repeat.text
        logged = (await running.api.get(f"/v1/tasks/{task['id']}/callbacks")).json()["data"]
        assert len(logged) == 3
        got = (await running.api.get(f"/v1/tasks/{task['id']}")).json()
        assert got["state"] == "succeeded" and got["result"]["images"][0]["url"] == "https://cdn.example/0.png"

        # A result that comes after the log filled up with progress callbacks is not lost.
        minted = (await running.api.post("/v1/callback-urls", json={"provider": "kling"})).json()
        other, other_url = minted["task"], minted["callback_url"]

        def kling(status: str, updated: int, **extra: Any) -> dict[str, Any]:
            return {"task_id": "k-1", "task_status": status, "task_status_msg": "", "created_at": 1,
                    "updated_at": updated, **extra}

        for n in range(4):
            answer = await running.post_callback(other_url, kling("processing", n + 1))
            assert answer.status_code == 200, answer.text
        images = {"images": [{"index": 0, "url": "https://cdn.example/k.png"}]}
        done = await running.post_callback(other_url, kling("succeed", 9, task_result=images))
        assert done.status_code == 200 and not done.json().get("ignored"), done.text
        finished = (await running.api.get(f"/v1/tasks/{other['id']}")).json()
        assert finished["state"] == "succeeded" and finished["result"]["images"][0]["url"] == "https://cdn.example/k.png"
        # The result moved the task, so it is in the log past the cap (a leaked URL cannot push it
        # out with progress callbacks), and a repeat of it is a duplicate, as the contract says.
        other_log = (await running.api.get(f"/v1/tasks/{other['id']}/callbacks")).json()["data"]
        assert len(other_log) == 4 and other_log[-1]["body"]["task_status"] == "succeed"
        again = await running.post_callback(other_url, kling("succeed", 9, task_result=images))
        assert again.status_code == 200 and again.json()["duplicate"] is True, again.text
        assert len((await running.api.get(f"/v1/tasks/{other['id']}/callbacks")).json()["data"]) == 4


async def test_limits_are_read_from_the_environment() -> None:
    from receiver.config import Settings

    settings = Settings.from_env(
        {
            "RECEIVER_SHUTDOWN_TIMEOUT": "3",
            "RECEIVER_KEEP_ALIVE_TIMEOUT": "2",
            "RECEIVER_HEADER_TIMEOUT": "4",
            "RECEIVER_BODY_TIMEOUT": "20",
            "RECEIVER_MAX_HEADER_BYTES": "4096",
            "RECEIVER_MAX_STREAMS_PER_KEY": "7",
            "RECEIVER_MAX_CALLBACKS_PER_TASK": "9",
        }
    )
    assert (
        settings.shutdown_timeout,
        settings.keep_alive_timeout,
        settings.header_timeout,
        settings.body_timeout,
        settings.max_header_bytes,
        settings.max_streams_per_key,
        settings.max_callbacks_per_task,
    ) == (3.0, 2.0, 4.0, 20.0, 4096, 7, 9)
    from receiver.protocol import server_options

    options = server_options(settings)
    assert options["timeout_graceful_shutdown"] == 3.0 and options["timeout_keep_alive"] == 2.0
    assert options["http"].keywords == {"header_timeout": 4.0, "max_header_bytes": 4096, "body_timeout": 20.0}


async def test_openapi_names_the_limits(running: Running) -> None:
    spec = (await running.api.get("/openapi.json")).json()
    callback = spec["paths"]["/callbacks/{token}"]["post"]["responses"]
    assert {"408", "413", "431"} <= set(callback) and "429" not in callback  # never refused as one too many
    task = spec["paths"]["/v1/tasks/{task_id}"]["get"]["responses"]
    assert "429" in task
    assert "429" in spec["paths"]["/v1/tasks/{task_id}/events"]["get"]["responses"]
    assert "429" in spec["paths"]["/v1/stream"]["get"]["responses"]
