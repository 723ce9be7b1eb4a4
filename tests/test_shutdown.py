"""Graceful shutdown of a real `python -m receiver serve` process (SIGTERM).

What is in flight ends, or goes back where it came from, within RECEIVER_SHUTDOWN_TIMEOUT:
no new connections, a long-poll answered at once, a callback still arriving answered and stored,
a delivery that ends in time recorded, one that does not handed back to the outbox (sent after restart).
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from receiver.fakes.provider import FakeProvider
from receiver.server import free_port, serve_in_background
from tests.processes import Process, receiver_env
from tests.test_limits import Raw, error_code, head

pytestmark = pytest.mark.anyio

KEY = "shutdown-test-key"
GRACE = 3.0


@dataclass
class Endpoints:
    """Subscribers: `/slow` answers after SLOW seconds, `/stuck` only once `unstick` is set."""

    slow_seconds: float = 1.5
    arrivals: dict[str, list[str]] = field(default_factory=lambda: {"slow": [], "stuck": []})
    unstick: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> Starlette:
        async def hook(request: Request) -> Response:
            name = request.path_params["name"]
            self.arrivals[name].append(request.headers["webhook-id"])
            if name == "slow":
                await asyncio.sleep(self.slow_seconds)
            else:
                await self.unstick.wait()
            return Response(b"{}", 200, media_type="application/json")

        return Starlette(routes=[Route("/{name}", hook, methods=["POST"])])


@asynccontextmanager
async def world(tmp_path: Path) -> AsyncIterator[tuple[Process, Endpoints, str, httpx.AsyncClient]]:
    endpoints = Endpoints()
    provider = FakeProvider(delay=0.05)
    port = free_port()
    async with serve_in_background(provider.app) as provider_url, serve_in_background(endpoints.app()) as hooks:
        env = receiver_env(
            tmp_path, port, provider_url,
            RECEIVER_API_KEYS=KEY,
            RECEIVER_ALLOW_PRIVATE_URLS="1",
            RECEIVER_MIRROR_ASSETS="0",
            RECEIVER_SHUTDOWN_TIMEOUT=str(GRACE),
            RECEIVER_DELIVERY_TIMEOUT="30",
            RECEIVER_RETRY_SCHEDULE="0,0.2,0.2",
        )
        server = Process(env, port, tmp_path / "receiver.log")
        await server.start()
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, headers={"authorization": f"Bearer {KEY}"}, timeout=30) as api:
            try:
                yield server, endpoints, hooks, api
            finally:
                endpoints.unstick.set()
                if server.popen is not None and server.popen.poll() is None:
                    await server.stop(signal.SIGKILL)


async def test_sigterm_finishes_what_is_in_flight_and_hands_back_the_rest(tmp_path: Path) -> None:
    async with world(tmp_path) as (server, endpoints, hooks, api):
        assert server.popen is not None
        for name in ("slow", "stuck"):
            made = await api.post("/v1/subscriptions", json={"url": f"{hooks}/{name}", "events": ["task.submitted"]})
            assert made.status_code == 201, made.text
        minted = (await api.post("/v1/callback-urls", json={"provider": "xhuoapi"})).json()
        callback_path = urlsplit(minted["callback_url"]).path
        waited = (await api.post("/v1/tasks", json={"provider": "xhuoapi", "model": "nano-banana",
                                                     "prompt": "[silent] a pear"})).json()
        # In flight when the signal comes: a callback half sent, one that will never be finished,
        # a long-poll, a delivery about to end (slow) and one that will not end in time (stuck).
        body = orjson.dumps({"success": True, "task_id": "up-late",
                             "data": {"data": [{"url": "https://cdn.example/late.png"}]}})
        slow_callback, never_finished = Raw(api.base_url.__str__()), Raw(api.base_url.__str__())
        async with slow_callback, never_finished:
            for raw in (slow_callback, never_finished):
                await raw.send(head("POST", callback_path, "content-type: application/json",
                                    f"content-length: {len(body)}"))
                await raw.send(body[:10])
            poll = asyncio.create_task(api.get(f"/v1/tasks/{waited['id']}", params={"wait": 30}))
            await _until(lambda: len(endpoints.arrivals["slow"]) == len(endpoints.arrivals["stuck"]) == 2)
            await asyncio.sleep(0.3)  # the long-poll is waiting

            signalled = time.monotonic()
            server.popen.send_signal(signal.SIGTERM)

            # The long-poll is answered at once with the task as it is.
            answered = await asyncio.wait_for(poll, 2)
            assert answered.status_code == 200 and answered.json()["state"] == "submitted"
            assert time.monotonic() - signalled < 1.5
            # No new connections.
            await _until(lambda: _refused(server.port), timeout=2)
            # The callback still arriving is answered, and stored.
            await asyncio.sleep(0.3)
            await slow_callback.send(body[10:])
            status, _, answer = await slow_callback.answer()
            assert status == 200, answer
            # The process waits for the unfinished one until the deadline, answers it in the
            # contract's error shape (it may be sent again), then exits cleanly.
            status, headers, answer = await never_finished.answer(timeout=GRACE + 3)
            assert (status, error_code(answer), headers["connection"]) == (503, "shutting_down", "close"), answer
            code = await asyncio.to_thread(server.popen.wait, GRACE + 5)
            took = time.monotonic() - signalled
        assert code == 0, (tmp_path / "receiver.log").read_text()[-3000:]
        assert GRACE - 0.5 < took < GRACE + 3, took
        log = (tmp_path / "receiver.log").read_text()
        for bad in ("worker.failed", "request.crashed", "Traceback"):
            assert bad not in log, log[-3000:]

        # In the database: the slow delivery succeeded; the stuck ones are pending, without a lease.
        with sqlite3.connect(tmp_path / "data" / "receiver.db") as db:
            rows = db.execute(
                "SELECT s.url, d.status, d.lease_owner FROM deliveries d JOIN subscriptions s"
                " ON s.id = d.subscription_id ORDER BY s.url"
            ).fetchall()
            logged = db.execute("SELECT count(*) FROM callbacks WHERE task_id = ?", (minted["task"]["id"],)).fetchone()
        by_status = sorted((url.rsplit("/", 1)[1], status, owner) for url, status, owner in rows)
        assert by_status == [("slow", "succeeded", None), ("slow", "succeeded", None),
                             ("stuck", "pending", None), ("stuck", "pending", None)], by_status
        assert logged == (1,)  # the finished callback only

        # After a restart the handed-back deliveries go out, with the same webhook-ids.
        endpoints.unstick.set()
        stuck_before = list(endpoints.arrivals["stuck"])
        await server.start()
        await _until(lambda: len(endpoints.arrivals["stuck"]) >= 4, timeout=10)
        assert sorted(endpoints.arrivals["stuck"][2:]) == sorted(stuck_before)
        late = (await api.get(f"/v1/tasks/{minted['task']['id']}")).json()
        assert late["state"] == "succeeded"

        async def all_sent() -> bool:
            listed = (await api.get("/v1/deliveries", params={"limit": 100})).json()["data"]
            return len(listed) == 4 and all(d["status"] == "succeeded" for d in listed)

        deadline = time.monotonic() + 10
        while not await all_sent():
            assert time.monotonic() < deadline, "the handed-back deliveries were not sent after the restart"
            await asyncio.sleep(0.05)


async def test_an_idle_receiver_stops_at_once(tmp_path: Path) -> None:
    async with world(tmp_path) as (server, _, _, api):
        assert (await api.get("/healthz")).status_code == 200
        assert server.popen is not None
        started = time.monotonic()
        assert await server.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 2.0


def _refused(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return True
    return False


async def _until(check: object, timeout: float = 10.0) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout}s")
        await asyncio.sleep(0.02)
