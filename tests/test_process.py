"""The receiver as users run it: `receiver …` processes, restarts, the CLI and the demo."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import httpx
import pytest

from receiver import selftest
from receiver.server import free_port
from receiver.signing import CallbackSigner
from tests.conftest import API_KEY, NOTIFY_SECRET, needs_postgres, postgres_database, start_receiver
from tests.delivery.helpers import FAST, deliveries, eventually, new_task, sink, subscribe
from tests.processes import Process, api_key, cli, fake, receiver_env

pytestmark = pytest.mark.anyio

BODY = {"provider": "xhuoapi", "model": "nano-banana", "prompt": "[silent] a pear"}


async def test_nothing_is_lost_across_restarts(tmp_path: Path) -> None:
    port = free_port()
    async with fake() as (provider, provider_url):
        env = receiver_env(tmp_path, port, provider_url)
        server = Process(env, port, tmp_path / "receiver.log")
        await server.start()
        assert "Generated an API key" in (tmp_path / "receiver.log").read_text()  # printed once, first start
        headers = {"authorization": f"Bearer {api_key(tmp_path)}"}
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as api:
            silent = [(await api.post("/v1/tasks", json=BODY)).json() for _ in range(3)]
            urls = [r["json"]["callback_url"] for r in provider.requests]
            done = (await api.post("/v1/tasks", json={**BODY, "prompt": "a plum"})).json()
            assert (await api.get(f"/v1/tasks/{done['id']}", params={"wait": 10})).json()["state"] == "succeeded"
            # A callback acknowledged just before a crash must survive it.
            ack = await api.post(urls[0], json={"success": True, "task_id": silent[0]["upstream_task_id"],
                                                "data": {"data": [{"url": "https://cdn.example/1.png"}]}})
            assert ack.status_code == 200
        assert await server.stop(signal.SIGKILL) == -signal.SIGKILL

        await server.start()
        log_text = (tmp_path / "receiver.log").read_text()
        assert log_text.count("Generated an API key") == 1
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as api:
            states = {t["id"]: t["state"] for t in (await api.get("/v1/tasks")).json()["data"]}
            assert states == {silent[0]["id"]: "succeeded", silent[1]["id"]: "submitted",
                              silent[2]["id"]: "submitted", done["id"]: "succeeded"}
            assert len((await api.get(f"/v1/tasks/{silent[0]['id']}/callbacks")).json()["data"]) == 1
            # URLs minted before the restart still verify: the generated signing key was kept.
            late = await api.post(urls[1], json={"success": False, "task_id": silent[1]["upstream_task_id"],
                                                 "error": {"code": "nsfw", "message": "refused"}})
            assert late.status_code == 200
            assert (await api.get(f"/v1/tasks/{silent[1]['id']}")).json()["state"] == "failed"
        assert await server.stop() == 0
    assert "/callbacks/" not in log_text.replace("/callbacks/[redacted]", "")
    assert api_key(tmp_path) not in log_text.split("shown only this once", 1)[1].split("\n", 3)[-1]


async def test_the_cli_against_a_running_receiver(tmp_path: Path) -> None:
    port = free_port()
    async with fake() as (_, provider_url):
        env = receiver_env(tmp_path, port, provider_url, RECEIVER_API_KEYS="cli-key", RECEIVER_API_KEY="cli-key")
        server = Process(env, port, tmp_path / "receiver.log")
        await server.start()
        try:
            waited = await cli(env, "submit", "--provider", "xhuoapi", "--model", "gpt-image-2",
                               "--prompt", "a fig", "--param", "size=1024x1024", "--wait")
            assert waited.returncode == 0, waited.stderr
            assert "succeeded" in waited.stdout and "/images/" in waited.stdout
            assert "submitted" in waited.stderr  # progress was shown

            as_json = await cli(env, "submit", "--provider", "xhuoapi", "--model", "gpt-image-2",
                                "--prompt", "[refuse:402] x", "--json")
            assert as_json.returncode == 1 and "upstream_billing" in as_json.stderr
            assert json.loads(as_json.stdout)["task"]["state"] == "failed"

            listed = await cli(env, "tasks")
            assert listed.returncode == 0 and listed.stdout.splitlines()[0].split() == [
                "ID", "STATE", "PROVIDER", "MODEL", "IMAGES", "AGE", "UPSTREAM"]
            assert len(listed.stdout.splitlines()) == 3
            listed_json = json.loads((await cli(env, "tasks", "--json", "--state", "failed")).stdout)
            assert [t["state"] for t in listed_json["data"]] == ["failed"]

            minted = await cli(env, "callback-url", "--provider", "xhuoapi")
            assert minted.returncode == 0 and minted.stdout.strip().startswith(f"http://127.0.0.1:{port}/callbacks/")

            bad = await cli(env, "submit", "--provider", "xhuoapi", "--model", "gpt-image-2", "--prompt", "x",
                            "--param", "colour")
            assert bad.returncode == 2
            unauthorised = await cli({**env, "RECEIVER_API_KEY": "wrong"}, "tasks")
            assert unauthorised.returncode == 1 and "unauthorized" in unauthorised.stderr
        finally:
            await server.stop()


async def test_deliveries_and_redeliver_from_the_cli(tmp_path: Path) -> None:
    once = {**FAST, "retry_schedule": (0.0,)}
    async with sink(mode="fail") as (hook, url), start_receiver(tmp_path, **once) as running:
        sub = await subscribe(running, url)
        task, _ = await new_task(running)
        [failed] = await eventually(lambda: deliveries(running, status="failed"))
        env = {**receiver_env(tmp_path, 1, "http://127.0.0.1:9"), "RECEIVER_URL": running.url,
               "RECEIVER_API_KEY": API_KEY}

        listed = await cli(env, "deliveries")
        assert listed.returncode == 0, listed.stderr
        header, row = listed.stdout.splitlines()
        assert header.split() == ["ID", "STATUS", "EVENT", "TASK", "SUBSCRIPTION", "ATTEMPTS", "LAST", "UPDATED"]
        assert row.split()[:7] == [failed["id"], "failed", "task.submitted", task["id"], sub["id"], "1", "500"]
        as_json = json.loads((await cli(env, "deliveries", "--failed", "--json", "--task", task["id"])).stdout)
        assert [d["id"] for d in as_json["data"]] == [failed["id"]]
        assert json.loads((await cli(env, "deliveries", "--status", "succeeded", "--json")).stdout)["data"] == []

        hook.mode = "ok"
        again = await cli(env, "redeliver", failed["id"])
        assert again.returncode == 0 and f"{failed['id']}  pending" in again.stdout
        await hook.wait_for(lambda _: len(hook.verified) == 1)
        assert hook.verified[0].webhook_id == failed["event_id"]

        missing = await cli(env, "redeliver", "dlv_nope")
        assert missing.returncode == 1 and "delivery_not_found" in missing.stderr


async def test_migrate_and_help(tmp_path: Path) -> None:
    env = receiver_env(tmp_path, 1, "http://127.0.0.1:9")
    migrated = await cli(env, "migrate")
    assert migrated.returncode == 0 and (tmp_path / "data" / "receiver.db").exists()
    assert (await cli(env, "migrate")).returncode == 0  # idempotent
    for command in ("serve", "migrate", "demo", "doctor", "fake-provider", "callback-url", "submit", "tasks",
                    "deliveries", "redeliver"):
        shown = await cli(env, command, "--help")
        assert shown.returncode == 0 and "example:" in shown.stdout and "--json" in shown.stdout, command
    as_json = await cli(env, "migrate", "--json")
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["migrations"] == "current"
    broken = await cli({**env, "RECEIVER_MAX_BODY_BYTES": "lots"}, "migrate")
    assert broken.returncode == 2 and "RECEIVER_MAX_BODY_BYTES" in broken.stderr


@needs_postgres
async def test_several_workers_on_postgres(tmp_path: Path) -> None:
    port = free_port()
    async with postgres_database() as url, fake() as (_, provider_url):
        env = receiver_env(tmp_path, port, provider_url, RECEIVER_DATABASE_URL=url, RECEIVER_SECRET_KEY="shared",
                           RECEIVER_API_KEYS="key", RECEIVER_NOTIFY_SECRET=NOTIFY_SECRET)
        migrations = await asyncio.gather(cli(env, "migrate"), cli(env, "migrate"))  # an advisory lock orders them
        assert [m.returncode for m in migrations] == [0, 0], [m.stderr for m in migrations]
        server = Process(env, port, tmp_path / "receiver.log", "--workers", "2")
        await server.start()
        try:
            base = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(base_url=base, headers={"authorization": "Bearer key"}, timeout=30) as api:
                # Callbacks and long-polls land on either worker process; each answers for the other's writes.
                tasks = [(await api.post("/v1/tasks", json={**BODY, "prompt": "a plum"})).json() for _ in range(6)]
                for task in tasks:
                    shown = (await api.get(f"/v1/tasks/{task['id']}", params={"wait": 10})).json()
                    assert shown["state"] == "succeeded", shown
                # /metrics adds up the workers, whichever of them answers the scrape.
                for _ in range(8):
                    scraped = _samples((await api.get("/metrics", headers={"connection": "close"})).text)
                    assert scraped[("receiver_callbacks_total", (("outcome", "accepted"),))] == 6, scraped
                    accepted = (("outcome", "accepted"), ("provider", "xhuoapi"))
                    assert scraped[("receiver_submissions_total", accepted)] == 6
                    assert scraped[("receiver_tasks", (("state", "succeeded"),))] == 6
        finally:
            assert await server.stop() == 0
        assert "config.secrets_not_shared" not in (tmp_path / "receiver.log").read_text()


async def test_demo_runs_the_whole_round_trip(tmp_path: Path) -> None:
    result = await cli(receiver_env(tmp_path, 1, "http://127.0.0.1:9"), "demo")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "task succeeded" in result.stdout and "callback received and stored" in result.stdout
    assert "notification received and verified: task.submitted" in result.stdout
    assert "notification received and verified: task.succeeded" in result.stdout
    # Only the demo's narration: no receiver warning about settings a demo never needs.
    assert "provider_signature.not_configured" not in result.stdout + result.stderr, result.stderr


async def test_serve_trusts_proxy_headers_from_the_allowed_addresses_and_doctor_checks_it(tmp_path: Path) -> None:
    port = free_port()
    secret = "process-signing-key-0123456789"
    env = receiver_env(tmp_path, port, "http://127.0.0.1:9", RECEIVER_SECRET_KEY=secret, RECEIVER_API_KEYS="k",
                       RECEIVER_API_KEY="k")
    token = selftest.mint(CallbackSigner([secret]), "nonce")
    proxied = {"x-forwarded-proto": "https", "x-forwarded-for": "203.0.113.9"}
    log = tmp_path / "receiver.log"
    for allowed, scheme, client in (("127.0.0.1", "https", "203.0.113.9"), ("10.9.9.9", "http", "127.0.0.1")):
        server = Process(env, port, log, "--forwarded-allow-ips", allowed, "--json")
        await server.start()
        try:
            async with httpx.AsyncClient() as http:
                seen = (await http.post(f"http://127.0.0.1:{port}/callbacks/{token}", headers=proxied)).json()
            assert (seen["self_test"], seen["scheme"], seen["client"]) == (True, scheme, client), allowed
            if allowed != "127.0.0.1":
                continue
            doctor = await cli(env, "doctor", "--json")
            report = json.loads(doctor.stdout)
            assert doctor.returncode == 0 and report["ok"] is True, doctor.stdout
            assert {c["name"]: c["status"] for c in report["checks"]}["self-test via public URL"] == "ok"
            broken = await cli({**env, "RECEIVER_PUBLIC_URL": "http://receiver.example.com"}, "doctor", "--offline")
            assert broken.returncode == 1 and "FAIL" in broken.stdout and "fix: use an https address" in broken.stdout
        finally:
            assert await server.stop() == 0
    lines = log.read_text().splitlines()
    started = [json.loads(line) for line in lines if line.startswith('{"listening"')]
    assert started[0]["dashboard"] == f"http://127.0.0.1:{port}/ui" and started[1]["forwarded_allow_ips"] == "10.9.9.9"
    # The access log shows who called, as the proxy headers say when they are trusted.
    requests = [json.loads(line) for line in lines if '"http.request"' in line and "/callbacks/" in line]
    seen = [(r["client"], r["scheme"]) for r in requests]  # the proxied post, doctor's self-tests, the proxied post
    assert seen[0] == ("203.0.113.9", "https") and seen[-1] == ("127.0.0.1", "http"), seen


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}
