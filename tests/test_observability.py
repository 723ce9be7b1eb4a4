"""Observability: /metrics series move by the right amounts, JSON log lines name their task and
delivery, and /readyz follows the database (lost → 503, back → 200, migrations behind → 503)."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sqlite3
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from receiver.logs import JsonFormatter
from receiver.signing import CallbackSigner
from receiver.store.postgres import PostgresStore
from tests.conftest import POSTGRES_URL, LogRecorder, Running, needs_postgres, start_receiver
from tests.delivery.helpers import FAST, eventually, sink, subscribe

pytestmark = pytest.mark.anyio

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(running: Running) -> Samples:
    async with httpx.AsyncClient(base_url=running.url) as anonymous:
        answer = await anonymous.get("/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    found: Samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def test_metrics_move_by_the_right_amounts(tmp_path: Path, logs: LogRecorder) -> None:
    settings = {**FAST, "retry_schedule": (0.0, 0.05), "poll_interval": 60.0}
    async with sink() as (_good, good_url), sink() as (bad, bad_url), sink() as (slow, slow_url), start_receiver(
        tmp_path, **settings
    ) as running:
        bad.mode = "fail"
        for url in (good_url, bad_url):
            await subscribe(running, url, events=["task.succeeded"])
        before = await scrape(running)
        assert ("receiver_outbox_depth", frozenset()) in before
        # Every series an alert may watch is there from the first scrape, at 0.
        for outcome in ("accepted", "duplicate", "ignored", "invalid_signature", "task_mismatch"):
            assert before[("receiver_callbacks_total", frozenset({("outcome", outcome)}))] == 0, outcome
        for outcome in ("succeeded", "retrying", "failed"):
            assert before[("receiver_deliveries_total", frozenset({("outcome", outcome)}))] == 0, outcome
        for kind in ("poll", "mirror", "router"):
            assert before[("receiver_poll_backlog", frozenset({("kind", kind)}))] == 0, kind
        for provider in ("xhuoapi", "xenodia", "router", "replicate", "fal"):
            labels = frozenset({("provider", provider), ("outcome", "accepted")})
            assert before[("receiver_submissions_total", labels)] == 0, provider
        assert before[("receiver_callbacks_total", frozenset({("outcome", "request_timeout")}))] == 0
        minted = (await running.api.post("/v1/callback-urls", json={"provider": "xhuoapi"})).json()
        task_id, url = minted["task"]["id"], minted["callback_url"]
        success = {"success": True, "task_id": "up-1", "data": {"data": [{"url": "https://cdn.example/a.png"}]}}
        assert (await running.post_callback(url, success)).json()["duplicate"] is False  # accepted
        assert (await running.post_callback(url, success)).json()["duplicate"] is True  # duplicate
        assert (await running.post_callback(url, {"nothing": "known"})).status_code == 400  # refused
        forged = CallbackSigner(["another-key"]).mint(task_id, max_age=60, scope="xhuoapi")
        assert (await running.post_callback(f"{running.url}/callbacks/{forged}", success)).status_code == 403

        async def settled() -> bool:
            listed = (await running.api.get("/v1/deliveries", params={"task_id": task_id})).json()["data"]
            return len(listed) == 2 and all(d["status"] != "pending" for d in listed)

        await eventually(settled)
        listed = (await running.api.get("/v1/deliveries", params={"task_id": task_id})).json()["data"]
        by_status = {d["status"]: d for d in listed}
        assert set(by_status) == {"succeeded", "failed"}
        failed_attempts = len(by_status["failed"]["attempts"])
        assert failed_attempts == 2  # the schedule's two tries
        after = await scrape(running)

        assert moved(before, after, "receiver_callbacks_total", outcome="accepted") == 1
        assert moved(before, after, "receiver_callbacks_total", outcome="duplicate") == 1
        assert moved(before, after, "receiver_callbacks_total", outcome="invalid_payload") == 1
        assert moved(before, after, "receiver_callbacks_total", outcome="invalid_signature") == 1
        assert moved(before, after, "receiver_deliveries_total", outcome="succeeded") == 1
        assert moved(before, after, "receiver_deliveries_total", outcome="failed") == 1
        assert moved(before, after, "receiver_deliveries_total", outcome="retrying") == failed_attempts - 1
        assert moved(before, after, "receiver_delivery_latency_seconds_count") == 1 + failed_attempts
        assert moved(before, after, "receiver_delivery_latency_seconds_sum") > 0
        assert value(after, "receiver_tasks", state="succeeded") == 1
        assert value(after, "receiver_tasks", state="submitted") == 0
        assert value(after, "receiver_outbox_depth") == 0

        # Outbox depth: a delivery held by a subscriber that does not answer yet.
        slow.mode = "hang"
        await subscribe(running, slow_url, events=["task.submitted"])
        assert (await running.api.post("/v1/callback-urls", json={"provider": "kie"})).status_code == 201
        await slow.wait_for(lambda got: len(got) >= 1)
        assert value(await scrape(running), "receiver_outbox_depth") == 1
        slow.mode = "ok"
        slow.release()

        async def drained() -> bool:
            return value(await scrape(running), "receiver_outbox_depth") == 0

        await eventually(drained)
        assert value(await scrape(running), "receiver_tasks", state="submitted") == 1  # the held task

    # Structured logs name the task and the delivery on the events about them.
    formatter = JsonFormatter()
    lines = [orjson.loads(formatter.format(r)) for r in logs.records]
    recorded = [line for line in lines if line["event"] == "callback.recorded"]
    assert recorded and all(line["task_id"] == task_id for line in recorded[:2])
    for event in ("delivery.succeeded", "delivery.retrying", "delivery.failed"):
        about = [line for line in lines if line["event"] == event]
        assert about, event
        assert all(line["task_id"].startswith("tsk_") and line["delivery_id"].startswith("dlv_") for line in about)
        assert any(line["task_id"] == task_id for line in about), about
    assert {line["delivery_id"] for line in lines if line["event"] == "delivery.failed"} == {by_status["failed"]["id"]}


async def test_poll_backlog_counts_waiting_polls(tmp_path: Path, fake_provider: tuple[object, str]) -> None:
    async with start_receiver(tmp_path, provider_url=fake_provider[1], poll_interval=60.0) as running:
        before = await scrape(running)
        submitted = await running.api.post("/v1/tasks", json={"provider": "xenodia", "model": "nano-banana-pro",
                                                              "prompt": "a cat"})
        assert submitted.status_code == 202, submitted.text
        after = await scrape(running)
        assert moved(before, after, "receiver_poll_backlog", kind="poll") == 1
        assert value(after, "receiver_tasks", state="submitted") == 1


def test_a_job_kind_with_nothing_waiting_shows_zero_not_its_last_count() -> None:
    from receiver.metrics import Metrics

    metrics = Metrics()
    assert b'receiver_poll_backlog{kind="poll"} 3.0' in metrics.render({"jobs": {"poll": 3}})
    assert b'receiver_poll_backlog{kind="poll"} 0.0' in metrics.render({"jobs": {}})


async def ready(running: Running) -> int:
    async with httpx.AsyncClient(base_url=running.url, timeout=15) as anonymous:
        answer = await anonymous.get("/readyz")
    if answer.status_code == 503:  # the contract's error shape, and the reason beside it for probes
        body = answer.json()
        assert body["error"]["code"] == "not_ready" and body["reason"] in body["error"]["message"], body
        assert body["status"] == "unavailable" and answer.headers["retry-after"] == "1"
    return answer.status_code


async def until_ready(running: Running, status: int, timeout: float = 20.0) -> None:
    async def check() -> bool:
        return await ready(running) == status

    await eventually(check, timeout=timeout)


async def test_readyz_follows_the_sqlite_database(tmp_path: Path) -> None:
    folder = tmp_path / "db"
    async with start_receiver(tmp_path, database_url=f"sqlite:///{folder}/receiver.db") as running:
        assert await ready(running) == 200
        # Lost: the folder is gone and the writer process dies; it cannot come back while the folder is away.
        folder.rename(tmp_path / "away")
        writer = running.ctx.store._writer  # type: ignore[attr-defined]
        os.kill(writer._pid, signal.SIGKILL)
        await until_ready(running, 503)
        await asyncio.sleep(0.3)
        assert await ready(running) == 503  # and stays so
        # Back: the writer is started again and readiness follows.
        (tmp_path / "away").rename(folder)
        await until_ready(running, 200)
        assert (await running.api.post("/v1/callback-urls", json={"provider": "kie"})).status_code == 201

        # Migrations behind the code: 503 until they are current again.
        with sqlite3.connect(folder / "receiver.db") as conn:
            latest = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0]
            conn.execute("UPDATE schema_migrations SET version = version || '-old' WHERE version = ?", (latest,))
        assert await ready(running) == 503
        with sqlite3.connect(folder / "receiver.db") as conn:
            conn.execute("UPDATE schema_migrations SET version = ? WHERE version = ?", (latest, f"{latest}-old"))
        assert await ready(running) == 200


@needs_postgres
async def test_readyz_follows_the_postgres_database(tmp_path: Path) -> None:
    name = f"receiver_ready_{secrets.token_hex(4)}"
    url = urlunsplit(urlsplit(POSTGRES_URL)._replace(path=f"/{name}"))
    admin = await asyncpg.connect(POSTGRES_URL, timeout=10)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        async with start_receiver(tmp_path, database_url=url) as running:
            assert await ready(running) == 200
            # Its connections are cut: the pool connects again, and readiness comes back.
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
            await until_ready(running, 200)
            # The database is gone: nothing to connect to.
            await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
            await until_ready(running, 503)
            # Back, but empty: migrations are not current.
            await admin.execute(f"CREATE DATABASE {name}")
            await until_ready(running, 503)
            async with httpx.AsyncClient(base_url=running.url) as anonymous:
                reason = (await anonymous.get("/readyz")).json()["reason"]
            assert "migrations" in reason or "unavailable" in reason
            store = PostgresStore(url)
            await store.open()  # migrates
            await store.close()
            await until_ready(running, 200)
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


def test_other_libraries_warnings_are_json_lines_too() -> None:
    """Without a handler of their own they would come out as plain text among the JSON lines."""
    import subprocess
    import sys

    script = (
        "import logging; from receiver.logs import configure_logging; configure_logging('info');"
        "logging.getLogger('somelib').warning('disk %s', 'slow');"
        "logging.getLogger('python_multipart.multipart').warning('Expected boundary character 45')"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    lines = [orjson.loads(line) for line in done.stderr.splitlines()]  # every line is JSON
    assert [(line["level"], line["logger"], line["event"]) for line in lines] == [("warning", "somelib", "disk slow")]
