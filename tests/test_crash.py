"""Crash consistency: a real `receiver serve` SIGKILLed at several points loses nothing it acknowledged.

Each test posts work at a running receiver, kills it (or its SQLite writer) in the middle, starts
it again and then checks, on SQLite and on PostgreSQL: every callback answered 200 is stored with
its task terminal, and every event the database holds reached the subscriber at least once, under
one `webhook-id` however often it was sent (tests.processes.check_outcome).

Leases held by the dead process must lapse before another takes the work: the environment
shortens them (RECEIVER_DELIVERY_TIMEOUT=1: deliveries 7 s; RECEIVER_JOB_LEASE=3: jobs 3 s).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from receiver.server import free_port
from tests.conftest import database_for, needs_postgres
from tests.delivery.helpers import sink
from tests.processes import (
    IMAGES,
    POLLS,
    Ledger,
    Process,
    api,
    at_once,
    check_outcome,
    crash_env,
    fake,
    mint,
    post_all,
    subscribe,
    until,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

DATABASES = [pytest.param("sqlite", id="sqlite"), pytest.param("postgres", id="postgres", marks=needs_postgres)]


@asynccontextmanager
async def crashable(
    tmp_path: Path, database: str, *, sink_mode: str = "ok", fake_options: dict[str, Any] | None = None, **env: str
) -> AsyncIterator[tuple[Process, Any, Any]]:
    """A `receiver serve` on `database` (a fresh PostgreSQL schema, or SQLite under tmp_path) with the
    fake provider and a subscribed sink: (the process, the sink, the fake provider)."""
    port = free_port()
    async with (
        database_for(database, tmp_path / "data" / "receiver.db") as url,
        fake(**(fake_options or {})) as (provider, provider_url),
        sink(mode=sink_mode) as (hook, hook_url),
        Process(crash_env(tmp_path, port, provider_url, url, **env), port, tmp_path / "receiver.log") as server,
    ):
        await subscribe(server.url, hook_url)
        yield server, hook, provider


async def retry_unacknowledged(ledger: Ledger, tasks: list[tuple[str, str]], timeout: float = 20.0) -> None:
    """What a provider does after a 503 or a dropped connection: post again until answered 200."""
    async def settled() -> bool:
        todo = [(t, u) for t, u in tasks if t not in ledger.acked]
        await post_all(ledger, todo)
        return len(ledger.acked) == len(tasks)

    await until(settled, timeout, "every callback acknowledged on retry")


@pytest.mark.parametrize("database", DATABASES)
async def test_killed_while_callbacks_commit(tmp_path: Path, database: str) -> None:
    async with crashable(tmp_path, database) as (server, hook, _):
        tasks = await mint(server.url, 150)
        ledger = Ledger()
        posting = asyncio.create_task(post_all(ledger, tasks, concurrency=12))
        await at_once(lambda: len(ledger.acked) >= 40, 20, "40 callbacks acknowledged")
        await server.kill()  # callbacks in flight: some mid-commit, some answered, some not yet read
        await posting
        killed_with = (len(ledger.acked), len(ledger.unanswered))
        assert killed_with[0] < len(tasks) and killed_with[1] > 0, killed_with

        await server.start()
        before = set(ledger.acked)
        async with api(server.url) as client:  # acknowledged before the crash: stored, before any retry
            for task_id in before:
                assert (await client.get(f"/v1/tasks/{task_id}")).json()["state"] == "succeeded", task_id
        await retry_unacknowledged(ledger, tasks)
        outcome = await check_outcome(server.url, hook, ledger, [t for t, _ in tasks])
        print(outcome.summary(f"crash mid-commit ({database}, {killed_with[0]} acknowledged before the kill)"))
        await server.stop()


async def test_killed_sqlite_writer_is_revived_and_loses_nothing(tmp_path: Path) -> None:
    async with crashable(tmp_path, "sqlite") as (server, hook, _):
        tasks = await mint(server.url, 150)
        writers = [pid for pid, line in server.descendants() if "receiver.store.writer" in line]
        assert len(writers) >= 2, server.descendants()  # the helper and the writer it forked

        ledger = Ledger()
        posting = asyncio.create_task(post_all(ledger, tasks, concurrency=12))
        await at_once(lambda: len(ledger.acked) >= 20, 20, "20 callbacks acknowledged")
        for pid in writers:  # the writer mid-batch, and the helper that would fork its successor
            os.kill(pid, signal.SIGKILL)
        await posting
        assert server.running(), "the receiver died with its writer"
        assert ledger.answered_503 > 0  # the kill did land mid-batch
        # Nothing dropped a connection: every answer was 200 or 503 store_unavailable.
        assert not ledger.unanswered and not ledger.refused, (ledger.unanswered, ledger.refused)

        await retry_unacknowledged(ledger, tasks)
        revived = [pid for pid, line in server.descendants() if "receiver.store.writer" in line]
        assert revived and not set(revived) & set(writers), (writers, revived)
        outcome = await check_outcome(server.url, hook, ledger, [t for t, _ in tasks])
        print(outcome.summary(f"writer killed ({ledger.answered_503} answers were 503, then retried)"))
        assert await server.stop() == 0
    assert "store.writer_died" in (tmp_path / "receiver.log").read_text()


@pytest.mark.parametrize("database", DATABASES)
async def test_killed_while_deliveries_are_in_flight(tmp_path: Path, database: str) -> None:
    async with crashable(tmp_path, database, sink_mode="hang") as (server, hook, _):
        tasks = await mint(server.url, 20)
        ledger = Ledger()
        await post_all(ledger, tasks)
        assert len(ledger.acked) == len(tasks)
        await hook.wait_for(lambda got: hook.in_flight >= 10)  # the subscriber holds sends open
        await server.kill()
        hook.mode = "ok"

        await server.start()
        outcome = await check_outcome(server.url, hook, ledger, [t for t, _ in tasks])
        print(outcome.summary(f"crash mid-delivery ({database})"))
        assert outcome.duplicates > 0  # the sends cut off were made again, under their webhook-ids
        await server.stop()


@pytest.mark.parametrize("database", DATABASES)
async def test_killed_while_polling(tmp_path: Path, database: str) -> None:
    polling = {"RECEIVER_POLL_INTERVAL": "0.2", "RECEIVER_POLL_MAX_INTERVAL": "0.3", "RECEIVER_JOB_LEASE": "3"}
    slow = {"delay": 2.0, "hold_polls": 0.4}
    async with crashable(tmp_path, database, fake_options=slow, **polling) as (server, hook, provider):
        body = {"provider": "xenodia", "model": "nano-banana-pro", "prompt": "a lighthouse"}
        async with api(server.url) as client:
            submitted = await asyncio.gather(*(client.post("/v1/tasks", json=body) for _ in range(12)))
        assert all(a.status_code == 202 for a in submitted), [a.text for a in submitted]
        task_ids = [a.json()["id"] for a in submitted]

        def polls() -> int:
            return sum(1 for r in provider.requests if r["method"] == "GET" and r["path"].startswith("/v1/tasks/"))

        await at_once(lambda: polls() >= 12 and provider.front.in_flight[POLLS] >= 6, 20, "polls in flight")
        await server.kill()  # the jobs of the polls in flight stay leased to the dead process
        polled_before = polls()

        await server.start()
        async with api(server.url) as client:
            async def finished() -> bool:
                shown = [(await client.get(f"/v1/tasks/{t}")).json()["state"] for t in task_ids]
                return all(state == "succeeded" for state in shown)

            await until(finished, 25, "every polled task succeeded after the restart")
        assert polls() > polled_before
        outcome = await check_outcome(server.url, hook, Ledger(), task_ids, expect_terminal=task_ids)
        print(outcome.summary(f"crash mid-polling ({database})"))
        await server.stop()


@pytest.mark.parametrize("database", DATABASES)
async def test_killed_while_images_are_mirrored(tmp_path: Path, database: str) -> None:
    """A success is acknowledged with its images still to keep; killed mid-download, the restarted
    receiver keeps them and announces each success once, with the kept links."""
    mirroring = {"RECEIVER_MIRROR_ASSETS": "1", "RECEIVER_JOB_LEASE": "3"}
    async with crashable(tmp_path, database, fake_options={"hold_images": 1.0}, **mirroring) as (
        server, hook, provider,
    ):
        tasks = await mint(server.url, 16)
        task_ids = [t for t, _ in tasks]
        ledger = Ledger(image_url=f"{provider.url}{IMAGES}{{upstream}}.png")
        await post_all(ledger, tasks)
        assert len(ledger.acked) == len(tasks)

        async def shown() -> dict[str, dict[str, Any]]:
            async with api(server.url) as client:
                return {t: (await client.get(f"/v1/tasks/{t}")).json() for t in task_ids}

        await at_once(lambda: provider.front.in_flight[IMAGES] >= 2, 20, "downloads in flight")
        pending = [t for t, task in (await shown()).items() if task["result"]["mirror"] == "pending"]
        await server.kill()  # the mirror jobs of the downloads in flight stay leased to the dead process
        assert pending, "every image was kept before the kill"

        await server.start()

        async def kept() -> dict[str, dict[str, Any]] | None:
            now = await shown()
            return now if all(task["result"]["mirror"] != "pending" for task in now.values()) else None

        tasks_now = await until(kept, 30, "every task's images kept after the restart")
        outcome = await check_outcome(server.url, hook, ledger, task_ids)
        for task_id, task in tasks_now.items():
            [image] = task["result"]["images"]
            assert task["result"]["mirror"] == "done", task
            assert image["asset_url"].startswith(f"{server.url}/assets/"), image
            [announced] = {r.webhook_id: r.event for r in hook.verified
                           if r.task_id == task_id and r.type == "task.succeeded"}.values()
            assert announced["data"] == task, "the success went out before its images were kept"
        print(outcome.summary(f"crash mid-mirroring ({database})"))
        await server.stop()


async def test_a_connection_refused_is_not_an_acknowledgement(tmp_path: Path) -> None:
    """The ledger counts only 200s: a dead receiver's callbacks are unanswered (the checks can fail)."""
    ledger = Ledger()
    async with httpx.AsyncClient() as client:
        await ledger.post(client, "tsk_x", f"http://127.0.0.1:{free_port()}/callbacks/nope")
    assert ledger.unanswered == {"tsk_x"} and not ledger.acked
