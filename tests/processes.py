"""Real `python -m receiver serve` processes for the system tests (restarts, crashes, several instances).

    env = receiver_env(tmp_path, port, provider_url, RECEIVER_DATABASE_URL=url)
    server = Process(env, port, tmp_path / "receiver.log")
    await server.start()            # returns once /readyz answers 200
    await server.kill()             # SIGKILL: no shutdown, no lease handed back

`Ledger` keeps what a test posted and how each post was answered, and `check_outcome`
states what a crash must never break: every acknowledged callback stored with its task
terminal, and every event that the database holds delivered at least once, with one
`webhook-id` per event however often it was sent.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from receiver.fakes.provider import FakeProvider
from receiver.fakes.subscriber import FakeSubscriber
from tests.conftest import API_KEY, NOTIFY_SECRET
from tests.delivery.helpers import SECRET, eventually

TERMINAL = {"succeeded", "failed", "expired", "cancelled"}


def receiver_env(tmp_path: Path, port: int, provider_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECEIVER_")}
    env.update(
        {
            "RECEIVER_DATABASE_URL": f"sqlite:///{tmp_path}/data/receiver.db",
            "RECEIVER_PUBLIC_URL": f"http://127.0.0.1:{port}",
            "RECEIVER_XHUOAPI_URL": provider_url,
            "RECEIVER_XHUOAPI_API_KEY": "provider-key",
            "RECEIVER_URL": f"http://127.0.0.1:{port}",
            **extra,
        }
    )
    return env


def crash_env(tmp_path: Path, port: int, provider_url: str, database_url: str, **extra: str) -> dict[str, str]:
    """An instance for the crash tests: shared secrets (so instances and restarts agree), private
    subscriber URLs allowed, no mirroring, retries and leases compressed to seconds."""
    return receiver_env(
        tmp_path,
        port,
        provider_url,
        **{
            "RECEIVER_DATABASE_URL": database_url,
            "RECEIVER_SECRET_KEY": "crash-test-signing-key-0123456789",
            "RECEIVER_API_KEYS": API_KEY,
            "RECEIVER_NOTIFY_SECRET": NOTIFY_SECRET,
            "RECEIVER_ALLOW_PRIVATE_URLS": "1",
            "RECEIVER_MIRROR_ASSETS": "0",
            "RECEIVER_XENODIA_URL": provider_url,
            "RECEIVER_XENODIA_API_KEY": "provider-key",
            "RECEIVER_RETRY_SCHEDULE": "0,0.2,0.5,1,1,1,1,1,1,1,1,1",
            "RECEIVER_DELIVERY_TIMEOUT": "1",  # a dead instance's delivery leases lapse after 1*2+5 s
            "RECEIVER_BREAKER_FAILURES": "1000",
            "RECEIVER_LOG_LEVEL": "warning",
            **extra,
        },
    )


class Process:
    def __init__(self, env: dict[str, str], port: int, log: Path, *args: str) -> None:
        self.env, self.port, self.log, self.args = env, port, log, args
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    async def start(self) -> None:
        with self.log.open("ab") as handle:  # the child keeps its own descriptor
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "receiver", "serve", "--port", str(self.port), *self.args],
                env=self.env, stdout=handle, stderr=subprocess.STDOUT, cwd=self.log.parent,
            )
        deadline = time.monotonic() + 20
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                assert self.popen.poll() is None, self.log.read_text()
                try:
                    if (await client.get(f"http://127.0.0.1:{self.port}/readyz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError("the receiver did not start:\n" + self.log.read_text())

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.popen is not None
        self.popen.send_signal(sig)
        return await asyncio.to_thread(self.popen.wait, 20)

    async def kill(self) -> None:
        """SIGKILL: the process ends between two instructions, whatever it was doing."""
        assert await self.stop(signal.SIGKILL) == -signal.SIGKILL

    async def __aenter__(self) -> Process:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """A test that failed halfway leaves no process behind."""
        if self.running():
            await self.kill()

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def descendants(self) -> list[tuple[int, str]]:
        """(pid, command line) of every process below this one (Linux /proc)."""
        found: list[tuple[int, str]] = []
        parents = {self.pid}
        for _ in range(4):
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit() or int(entry.name) in {p for p, _ in found}:
                    continue
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
                except (OSError, IndexError, ValueError):
                    continue
                if ppid in parents:
                    found.append((int(entry.name), cmdline))
            parents |= {p for p, _ in found}
        return found


POLLS, IMAGES = "/v1/tasks/", "/images/"  # the fake provider's paths for polls and image downloads


class Held:
    """ASGI middleware in front of the fake provider: a GET whose path starts with one of `pauses`
    is held that many seconds (xenodia polls `/v1/tasks/`, image downloads `/images/`), so such
    requests are in flight (their jobs leased) when a test kills the receiver; `in_flight` counts
    them by prefix."""

    def __init__(self, app: Any, pauses: dict[str, float]) -> None:
        self.app, self.pauses = app, pauses
        self.in_flight: Counter[str] = Counter()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        is_get = scope["type"] == "http" and scope["method"] == "GET"
        prefix = next((p for p in self.pauses if scope["path"].startswith(p)), None) if is_get else None
        if prefix is None:
            await self.app(scope, receive, send)
            return
        self.in_flight[prefix] += 1
        try:
            await asyncio.sleep(self.pauses[prefix])
            await self.app(scope, receive, send)
        finally:
            self.in_flight[prefix] -= 1


@asynccontextmanager
async def fake(
    delay: float = 0.05, *, hold_polls: float = 0.0, hold_images: float = 0.0
) -> AsyncIterator[tuple[FakeProvider, str]]:
    """The fake provider on a socket, its xenodia polls and image downloads held so many seconds."""
    from receiver.server import serve_in_background

    provider = FakeProvider(delay=delay)
    pauses = {POLLS: hold_polls, IMAGES: hold_images}
    front = Held(provider.app, {prefix: pause for prefix, pause in pauses.items() if pause})
    async with serve_in_background(front) as url:
        provider.front, provider.url = front, url  # type: ignore[attr-defined]
        yield provider, url


def api_key(tmp_path: Path) -> str:
    return str(json.loads((tmp_path / "data" / "secrets.json").read_text())["api_key"])


async def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "receiver", *args], env=env, capture_output=True, text=True,
        timeout=60,
    )


def api(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {API_KEY}"}, timeout=30)


async def subscribe(url: str, hook: str) -> str:
    async with api(url) as client:
        answer = await client.post("/v1/subscriptions", json={"url": hook, "events": ["*"], "secret": SECRET})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


async def mint(url: str, count: int) -> list[tuple[str, str]]:
    """`count` tasks awaiting a callback (xhuoapi): (task id, callback URL) each."""
    async with api(url) as client:
        answers = await asyncio.gather(
            *(client.post("/v1/callback-urls", json={"provider": "xhuoapi"}) for _ in range(count))
        )
    assert all(a.status_code == 201 for a in answers), [a.text for a in answers if a.status_code != 201]
    return [(a.json()["task"]["id"], a.json()["callback_url"]) for a in answers]


def success(upstream: str, image_url: str = "https://cdn.example/{upstream}.png") -> dict[str, Any]:
    """An xhuoapi success callback (the shape of tests/test_e2e.py) with one image at `image_url`."""
    image = {"url": image_url.format(upstream=upstream)}
    return {"success": True, "task_id": upstream, "trace_id": "t", "data": {"created": 1, "data": [image]}}


@dataclass
class Ledger:
    """Every callback posted, by task: how it was answered (200, 503, or no answer at all)."""

    acked: set[str] = field(default_factory=set)
    unavailable: set[str] = field(default_factory=set)  # 503 store_unavailable: the provider retries
    unanswered: set[str] = field(default_factory=set)  # the connection died: the provider retries
    refused: list[str] = field(default_factory=list)  # anything else: always a failure
    answered_503: int = 0  # how many answers were 503 store_unavailable, retried or not
    image_url: str = "https://cdn.example/{upstream}.png"  # where each success's image is

    async def post(self, client: httpx.AsyncClient, task_id: str, callback_url: str) -> None:
        try:
            answer = await client.post(callback_url, json=success(f"up-{task_id}", self.image_url))
        except httpx.TransportError:
            self.unanswered.add(task_id)
            return
        if answer.status_code == 200 and answer.json().get("task_id") == task_id:
            self.acked.add(task_id)
            self.unavailable.discard(task_id)
            self.unanswered.discard(task_id)
        elif answer.status_code == 503 and answer.json()["error"]["code"] == "store_unavailable":
            self.unavailable.add(task_id)
            self.answered_503 += 1
        else:
            self.refused.append(f"{task_id}: {answer.status_code} {answer.text[:200]}")


async def post_all(ledger: Ledger, tasks: Sequence[tuple[str, str]], *, concurrency: int = 8) -> None:
    """Post every task's success callback, `concurrency` at a time (each URL names its instance)."""
    slots = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=0)

    async def one(client: httpx.AsyncClient, task_id: str, url: str) -> None:
        async with slots:
            await ledger.post(client, task_id, url)

    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        await asyncio.gather(*(one(client, task_id, url) for task_id, url in tasks))


async def until(check: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    """`eventually`, checked every 0.1 s: these checks ask a whole process or database."""
    return await eventually(check, timeout, what, every=0.1)


async def at_once(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Return the moment `condition` holds (checked every millisecond: for picking a kill point)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout:g}s still not: {what}")
        await asyncio.sleep(0.001)


async def all_deliveries(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params = {"limit": 100, **({"cursor": cursor} if cursor else {})}
        answer = await client.get("/v1/deliveries", params=params)
        assert answer.status_code == 200, answer.text
        found += answer.json()["data"]
        cursor = answer.json()["next_cursor"]
        if not cursor:
            return found


@dataclass(frozen=True)
class Outcome:
    tasks: dict[str, dict[str, Any]]
    deliveries: list[dict[str, Any]]
    sends: int  # requests the subscriber received for these deliveries
    duplicates: int  # of those, repeats of an event already received

    def summary(self, name: str) -> str:
        return (f"{name}: {len(self.tasks)} tasks, {len(self.deliveries)} events, {self.sends} sends,"
                f" {self.duplicates} duplicate sends")


async def check_outcome(
    url: str, hook: FakeSubscriber, ledger: Ledger, task_ids: Sequence[str], *, timeout: float = 30.0,
    expect_terminal: Sequence[str] = (),
) -> Outcome:
    """Wait until every event is delivered, then assert what a crash must never break."""
    assert not ledger.refused, ledger.refused
    async with api(url) as client:
        async def task(task_id: str) -> dict[str, Any]:
            answer = await client.get(f"/v1/tasks/{task_id}")
            assert answer.status_code == 200, answer.text
            shown: dict[str, Any] = answer.json()
            return shown

        tasks = {t: await task(t) for t in task_ids}
        for task_id in [*ledger.acked, *expect_terminal]:
            assert tasks[task_id]["state"] in TERMINAL, tasks[task_id]
            callbacks = (await client.get(f"/v1/tasks/{task_id}/callbacks")).json()["data"]
            assert callbacks, f"the acknowledged callback of {task_id} is not stored"

        async def settled() -> list[dict[str, Any]] | None:
            rows = [d for d in await all_deliveries(client) if d["task_id"] in tasks]
            return rows if rows and all(d["status"] == "succeeded" for d in rows) else None

        pending = []
        try:
            rows = await until(settled, timeout, "every delivery succeeded")
        except AssertionError:
            pending = [d for d in await all_deliveries(client) if d["status"] != "succeeded"]
            raise AssertionError(f"{len(pending)} deliveries never succeeded: {pending[:3]}") from None
        tasks = {t: await task(t) for t in task_ids}  # as delivered: no task moves once all is sent

    by_event = {d["event_id"]: d for d in rows}
    assert len(by_event) == len(rows), "two deliveries of one event to one subscription"
    # Every state a task reached has its event: nothing the outbox should hold was lost.
    types = Counter((d["task_id"], d["event_type"]) for d in rows)
    for task_id, shown in tasks.items():
        assert types[(task_id, "task.submitted")] == 1, (task_id, shown["state"])
        if shown["state"] in TERMINAL:
            assert types[(task_id, f"task.{shown['state']}")] == 1, (task_id, shown["state"])
    # Each event reached the subscriber, verified, under the delivery's webhook-id, and any
    # repeat carried the same id (a different id would be an event the subscriber cannot dedupe).
    received = [r for r in hook.received if r.task_id in tasks]
    delivered = {r.webhook_id for r in received if r.verified and r.status is not None and 200 <= r.status < 300}
    missing = set(by_event) - delivered
    assert not missing, f"{len(missing)} events never reached the subscriber"
    strangers = {r.webhook_id for r in received} - set(by_event)
    assert not strangers, f"sends under ids the database does not know: {sorted(strangers)[:3]}"
    for r in received:
        assert r.verified, r.error
        assert (r.task_id, r.type) == (by_event[r.webhook_id]["task_id"], by_event[r.webhook_id]["event_type"])
    sends = Counter(r.webhook_id for r in received)
    return Outcome(tasks, rows, len(received), sum(n - 1 for n in sends.values()))
