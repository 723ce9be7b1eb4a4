"""Two `receiver serve` processes on one PostgreSQL database, callbacks spread over both.

With one instance SIGKILLed midway, every acknowledged callback is stored and every event reaches
the subscriber at least once under one `webhook-id`; the sends the crash made twice are counted
and printed (`-s` shows the summary line). Without a crash, nothing is sent twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest

from receiver.fakes.subscriber import FakeSubscriber
from receiver.server import free_port
from tests.conftest import needs_postgres, postgres_database
from tests.delivery.helpers import sink
from tests.processes import Ledger, Process, at_once, check_outcome, crash_env, fake, mint, post_all, subscribe, until

pytestmark = [pytest.mark.anyio, pytest.mark.slow, needs_postgres]


@asynccontextmanager
async def two_instances(tmp_path: Path, **extra: str) -> AsyncIterator[tuple[list[Process], FakeSubscriber]]:
    """Instances A and B on one fresh schema (the same RECEIVER_DATABASE_URL), one subscriber."""
    async with (
        postgres_database() as url,
        fake() as (_, provider_url),
        sink() as (hook, hook_url),
        AsyncExitStack() as stack,
    ):
        servers = []
        for name in ("a", "b"):
            port = free_port()
            env = crash_env(tmp_path, port, provider_url, url, RECEIVER_DATA_DIR=str(tmp_path / name), **extra)
            servers.append(await stack.enter_async_context(Process(env, port, tmp_path / f"{name}.log")))
        await subscribe(servers[0].url, hook_url)
        yield servers, hook


def spread(tasks: list[tuple[str, str]], servers: list[Process]) -> list[tuple[str, str]]:
    """Each callback URL pointed at the instances in turn (a load balancer's round robin)."""
    return [
        (task_id, servers[i % len(servers)].url + url[url.index("/callbacks/") :])
        for i, (task_id, url) in enumerate(tasks)
    ]


async def test_one_instance_killed_midway_loses_nothing(tmp_path: Path) -> None:
    async with two_instances(tmp_path) as ([a, b], hook):
        tasks = await mint(a.url, 40) + await mint(b.url, 40)
        ledger = Ledger()
        posting = asyncio.create_task(post_all(ledger, spread(tasks, [a, b]), concurrency=12))
        await at_once(lambda: len(ledger.acked) >= 30, 20, "30 callbacks acknowledged")
        acked_by_then = len(ledger.acked)
        await b.kill()
        await posting
        assert ledger.unanswered, "the kill landed after every callback was answered"

        # The provider retries what was not acknowledged; the balancer sends it to the survivor.
        async def retried() -> bool:
            await post_all(ledger, [t for t in spread(tasks, [a]) if t[0] not in ledger.acked])
            return len(ledger.acked) == len(tasks)

        await until(retried, 20, "every callback acknowledged by the survivor")
        outcome = await check_outcome(a.url, hook, ledger, [t for t, _ in tasks])
        print(outcome.summary(f"two instances, B killed after {acked_by_then} acknowledgements"))
        assert a.running()


async def test_two_instances_without_a_crash_send_nothing_twice(tmp_path: Path) -> None:
    # No lease has to lapse here: a generous timeout keeps a busy machine's slow answer from
    # counting as a failed attempt (and its retry as a duplicate).
    async with two_instances(tmp_path, RECEIVER_DELIVERY_TIMEOUT="10") as ([a, b], hook):
        tasks = await mint(a.url, 40) + await mint(b.url, 40)
        ledger = Ledger()
        await post_all(ledger, spread(tasks, [a, b]), concurrency=12)
        assert len(ledger.acked) == len(tasks) and not ledger.unanswered
        outcome = await check_outcome(a.url, hook, ledger, [t for t, _ in tasks])
        print(outcome.summary("two instances, no crash"))
        assert len(outcome.deliveries) == 2 * len(tasks)  # task.submitted and task.succeeded each
        assert outcome.duplicates == 0
        assert await b.stop() == 0 and await a.stop() == 0
