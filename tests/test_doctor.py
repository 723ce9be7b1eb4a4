"""`receiver doctor` against running receivers: a good setup, and each problem it reports."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.datastructures import Secret
from starlette.responses import RedirectResponse
from starlette.routing import Route

from receiver.doctor import FAIL, OK, SKIP, WARN, Report, diagnose
from receiver.server import free_port, serve_in_background
from tests.conftest import API_KEY, NOTIFY_SECRET, Running, postgres_database, start_receiver

pytestmark = pytest.mark.anyio

PROVIDERS = ("XHUOAPI", "XENODIA", "ROUTER", "REPLICATE", "FAL")


def environment(running: Running, **changes: str | None) -> dict[str, str]:
    """The environment `running` was started with, as `receiver serve` would have read it."""
    settings = running.settings
    env = {
        "RECEIVER_DATABASE_URL": settings.database_url,
        "RECEIVER_PUBLIC_URL": settings.public_url,
        "RECEIVER_DATA_DIR": str(settings.data_dir),
        "RECEIVER_SECRET_KEY": "test-signing-key",
        "RECEIVER_API_KEYS": API_KEY,
        "RECEIVER_NOTIFY_SECRET": NOTIFY_SECRET,
        "RECEIVER_ASSET_DIR": str(settings.asset_dir),
        "RECEIVER_MIRROR_ASSETS": "1" if settings.mirror_assets else "0",
        "RECEIVER_ALLOW_PRIVATE_URLS": "1" if settings.allow_private_urls else "0",
        "RECEIVER_REPLICATE_WEBHOOK_SECRET": NOTIFY_SECRET,
        "RECEIVER_FAL_USER_IDS": "fal-user-1",
        **{f"RECEIVER_{name}_URL": "http://127.0.0.1:9" for name in PROVIDERS},  # a local fake: no key needed
    }
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def check(report: Report, name: str) -> tuple[str, str, str | None]:
    [found] = [c for c in report.checks if c.name == name]
    return found.status, found.message, found.fix


def statuses(report: Report) -> dict[str, str]:
    return {c.name: c.status for c in report.checks}


async def test_a_good_setup_passes(running: Running) -> None:
    report = await diagnose(environment(running), url=running.url)
    assert report.ok and report.problems == 0, report.text()
    assert statuses(report) == {
        "configuration": OK,
        "public URL": WARN,  # http on loopback: fine locally, unreachable for a real provider
        "secrets": OK,
        "database": OK,
        **{f"provider {name.lower()}": OK for name in PROVIDERS},
        "replicate signatures": OK,
        "fal signatures": OK,
        "asset folder": OK,
        "receiver": OK,
        "API key": OK,
        "self-test": OK,
        "self-test via public URL": OK,
    }
    assert "reaches this receiver" in check(report, "self-test via public URL")[1]
    assert "cloudflared" in (check(report, "public URL")[2] or "")
    assert await running.ctx.store.list_tasks(_all()) == []  # the self-tests left nothing behind
    shown = report.to_json()
    assert shown["ok"] is True and shown["problems"] == 0 and shown["warnings"] == 1
    assert {"name", "status", "message", "fix"} <= set(shown["checks"][0])
    assert "No problems" in report.text()


async def test_fal_without_its_account_ids_is_a_warning(running: Running) -> None:
    """fal's keys sign every fal account's webhooks: a leaked URL and an account of one's own would do."""
    report = await diagnose(environment(running, RECEIVER_FAL_USER_IDS=None), url=running.url, self_test=False)
    status, message, fix = check(report, "fal signatures")
    assert status == WARN and "every fal account" in message and fix and "RECEIVER_FAL_USER_IDS" in fix


def _all() -> Any:
    from receiver.store.base import TaskQuery

    return TaskQuery(limit=10)


@pytest.mark.parametrize(
    ("changes", "name", "status", "says"),
    [
        pytest.param({"RECEIVER_PUBLIC_URL": "http://receiver.example.com"}, "public URL", FAIL, "plain http",
                     id="http-public-url"),
        pytest.param({"RECEIVER_PUBLIC_URL": "https://receiver.example.com"}, "public URL", OK, "/callbacks/",
                     id="https-public-url"),
        pytest.param({"RECEIVER_DATABASE_URL": "sqlite:///{tmp}/missing/receiver.db"}, "database", FAIL,
                     "no SQLite database", id="no-database"),
        pytest.param({"RECEIVER_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/test"}, "database", FAIL,
                     "cannot connect", id="postgres-unreachable"),
        pytest.param({"RECEIVER_ASSET_DIR": "{tmp}/a-file/assets"}, "asset folder", FAIL, "not a directory",
                     id="asset-folder-unwritable"),
        pytest.param({"RECEIVER_XENODIA_URL": None}, "provider xenodia", WARN, "no API key", id="provider-key"),
        pytest.param({"RECEIVER_XENODIA_URL": None, "RECEIVER_XENODIA_API_KEY": "k"}, "provider xenodia", OK,
                     "key set", id="provider-key-set"),
        pytest.param({"RECEIVER_REPLICATE_WEBHOOK_SECRET": None}, "replicate signatures", WARN, "not checked",
                     id="replicate-secret"),
        pytest.param({"RECEIVER_FAL_JWKS_URL": "off"}, "fal signatures", WARN, "not checked", id="fal-off"),
        pytest.param({"RECEIVER_SECRET_KEY": "short"}, "secret key", WARN, "shorter than 16", id="weak-secret"),
        pytest.param({"RECEIVER_SECRET_KEY": None, "RECEIVER_API_KEYS": None, "RECEIVER_NOTIFY_SECRET": None},
                     "secrets", WARN, "not generated yet", id="secrets-missing"),
        pytest.param({"RECEIVER_POLL_INTERVAL": "soon"}, "configuration", FAIL, "RECEIVER_POLL_INTERVAL",
                     id="bad-variable"),
    ],
)
async def test_configuration_problems(
    running: Running, tmp_path: Path, changes: dict[str, str | None], name: str, status: str, says: str
) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    formatted = {k: v.format(tmp=tmp_path) if v else v for k, v in changes.items()}
    report = await diagnose(environment(running, **formatted), url=running.url, self_test=False)
    found, message, fix = check(report, name)
    assert (found, says in message) == (status, True), report.text()
    assert report.ok is (status != FAIL)
    if status in (WARN, FAIL):
        assert fix, f"{name} says what is wrong but not how to fix it"


async def test_secrets_generated_into_the_data_folder_are_read_not_written(tmp_path: Path) -> None:
    async with start_receiver(tmp_path) as running:
        (tmp_path / "secrets.json").write_text(
            f'{{"secret_key": "test-signing-key", "api_key": "{API_KEY}", "notify_secret": "{NOTIFY_SECRET}"}}'
        )
        env = environment(running, RECEIVER_SECRET_KEY=None, RECEIVER_API_KEYS=None, RECEIVER_NOTIFY_SECRET=None)
        report = await diagnose(env, url=running.url)
    assert report.ok, report.text()
    assert "generated" in check(report, "secrets")[1]
    assert check(report, "self-test via public URL")[0] == OK  # signed with the generated key


@asynccontextmanager
async def redirecting(target: str) -> AsyncIterator[str]:
    async def moved(request: Any) -> RedirectResponse:
        return RedirectResponse(target, status_code=308)

    async with serve_in_background(Starlette(routes=[Route("/{path:path}", moved, methods=["POST"])])) as url:
        yield url


async def test_what_the_public_url_reaches(running: Running, tmp_path: Path, fake_provider) -> None:
    async def via(public: str, **changes: str) -> tuple[str, str, str | None]:
        report = await diagnose(environment(running, RECEIVER_PUBLIC_URL=public, **changes), url=running.url)
        return check(report, "self-test via public URL")

    # No tunnel running.
    status, message, fix = await via(f"http://127.0.0.1:{free_port()}")
    assert status == FAIL and "nothing answers" in message and "cloudflared" in (fix or "")
    # A tunnel that leads to something else (here: the fake provider).
    status, message, _ = await via(fake_provider[1])
    assert status == FAIL and "HTTP 404, not as a receiver does" in message
    # A tunnel that redirects.
    async with redirecting(running.url) as url:
        status, message, _ = await via(url)
    assert status == FAIL and "redirects (HTTP 308" in message
    # Another receiver, with other secrets.
    async with start_receiver(tmp_path / "other", secret_keys=(Secret("another-signing-key"),)) as other:
        status, message, _ = await via(other.url)
    assert status == FAIL and "another secret key" in message
    # Another receiver with the same secrets, on its own SQLite file: not this one.
    async with start_receiver(tmp_path / "twin") as twin:
        status, message, fix = await via(twin.url)
    assert status == FAIL and "reaches another receiver" in message and running.url in (fix or "")


async def test_a_receiver_started_with_another_public_url(running: Running) -> None:
    # The same receiver, spelled differently: it hands out callback URLs for the address it was started with.
    public = running.url.replace("127.0.0.1", "localhost")
    report = await diagnose(environment(running, RECEIVER_PUBLIC_URL=public), url=running.url)
    status, message, fix = check(report, "public URL in use")
    assert status == FAIL and running.url in message and "restart" in (fix or "")
    assert check(report, "self-test via public URL")[0] == OK


async def test_the_running_receiver_has_other_keys(running: Running) -> None:
    report = await diagnose(environment(running, RECEIVER_API_KEY="wrong"), url=running.url)
    assert check(report, "API key")[0] == FAIL
    report = await diagnose(environment(running, RECEIVER_SECRET_KEY="another-signing-key"), url=running.url)
    status, message, _ = check(report, "self-test")
    assert status == FAIL and "refuses callback URLs signed" in message
    assert check(report, "self-test via public URL")[0] == SKIP


async def test_no_receiver_running(running: Running) -> None:
    report = await diagnose(environment(running), url=f"http://127.0.0.1:{free_port()}")
    status, message, fix = check(report, "receiver")
    assert status == FAIL and "nothing answers" in message and "receiver serve" in (fix or "")
    assert check(report, "self-test")[0] == SKIP and not report.ok


async def test_postgres_instances_of_one_deployment(tmp_path: Path) -> None:
    async with postgres_database() as url:
        async with start_receiver(tmp_path / "a", database_url=url) as a, start_receiver(
            tmp_path / "b", database_url=url
        ) as b:
            report = await diagnose(environment(a, RECEIVER_PUBLIC_URL=b.url), url=a.url)
        assert check(report, "database")[0] == OK and "PostgreSQL" in check(report, "database")[1]
        status, message, _ = check(report, "self-test via public URL")
        assert status == OK and "of this deployment" in message
        assert check(report, "asset folder")[0] == OK  # mirroring is off in the tests
        report = await diagnose(environment(a, RECEIVER_MIRROR_ASSETS="1"), url=a.url, self_test=False)
        assert check(report, "asset folder")[0] == WARN  # each instance would keep its own files


async def test_postgres_not_migrated(running: Running) -> None:
    async with postgres_database() as url:  # a fresh, empty schema
        report = await diagnose(environment(running, RECEIVER_DATABASE_URL=url), url=running.url, self_test=False)
    status, message, fix = check(report, "database")
    assert status == FAIL and "migrations not current" in message and "receiver migrate" in (fix or "")
