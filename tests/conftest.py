"""Shared fixtures: settings, stores, and real servers on 127.0.0.1.

Every test runs with a log recorder; a test fails if the receiver logged a
crash (an unhandled exception answered 500) while it ran, or a line carrying a
secret (`SecretAudit`: API keys, signing keys, provider keys, `whsec_` secrets,
callback tokens). A second audit listens for the whole session, so lines
logged outside any test (fixtures, teardown) are checked too.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
from starlette.applications import Starlette
from starlette.datastructures import Secret

from receiver.app import create_app
from receiver.config import ProviderSettings, Settings
from receiver.context import Context
from receiver.fakes.provider import FakeProvider
from receiver.logs import JsonFormatter
from receiver.server import free_port, serve_in_background
from receiver.store.sqlite import SQLiteStore
from receiver.types import Clock

POSTGRES_URL = os.environ.get("RECEIVER_TEST_POSTGRES_URL", "")
needs_postgres = pytest.mark.skipif(
    not POSTGRES_URL,
    reason="RECEIVER_TEST_POSTGRES_URL is not set (.ci/run sets postgresql://postgres@127.0.0.1:5432/test)",
)
API_KEY = "test-api-key"
NOTIFY_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class LogRecorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [
            {"event": r.getMessage(), **(getattr(r, "fields", None) or {})}
            for r in self.records
            if r.getMessage() == name
        ]


#: Secrets the tests configure; none may ever appear in a formatted log line.
KNOWN_SECRETS = (API_KEY, NOTIFY_SECRET, "test-signing-key", "provider-key")
_LEAKS = re.compile(
    "|".join(
        [
            *(re.escape(secret) for secret in KNOWN_SECRETS),
            r"whsec_[A-Za-z0-9+/=_-]{4,}",  # any Standard Webhooks secret
            r"/callbacks/(?!\[redacted\])[^/\s\"'?]+",  # a callback token (an itsdangerous string)
            r"/assets/(?!\[redacted\])[^/\s\"'?]+",  # a signed asset token
        ]
    )
)


class SecretAudit(logging.Handler):
    """Formats every `receiver` record as production would (JsonFormatter) and keeps the lines
    that carry a secret. Formatting at emit time sees the record as it was logged."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.formatter_ = JsonFormatter()
        self.lines = 0
        self.leaks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.formatter_.format(record)
        except Exception as exc:  # a line that cannot be formatted is a defect too
            self.leaks.append(f"unformattable record {record.getMessage()!r}: {exc!r}")
            return
        self.lines += 1
        if _LEAKS.search(line):
            self.leaks.append(line[:500])


@contextmanager
def _listening(*handlers: logging.Handler) -> Iterator[None]:
    """`handlers` hear every `receiver` log record, DEBUG and up, while the block runs."""
    logger = logging.getLogger("receiver")
    previous = logger.level
    for handler in handlers:
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
        logger.setLevel(previous)


@pytest.fixture(scope="session", autouse=True)
def session_log_audit() -> Iterator[SecretAudit]:
    """Every `receiver` log line of the whole session, searched for secrets at its end."""
    audit = SecretAudit()
    with _listening(audit):
        yield audit
    assert not audit.leaks, f"{len(audit.leaks)} log line(s) carried a secret: {audit.leaks[:5]}"


@pytest.fixture(autouse=True)
def logs() -> Iterator[LogRecorder]:
    recorder = LogRecorder()
    audit = SecretAudit()
    with _listening(recorder, audit):
        yield recorder
    crashes = recorder.events("request.crashed") + recorder.events("worker.failed")
    assert not crashes, f"the receiver crashed while the test ran: {crashes}"
    assert not audit.leaks, f"log line(s) carried a secret: {audit.leaks[:5]}"


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for a test: explicit secrets, a SQLite file under tmp_path, private URLs allowed."""
    base = Settings(
        database_url=f"sqlite:///{tmp_path}/receiver.db",
        public_url="http://127.0.0.1:1",
        data_dir=tmp_path,
        secret_keys=(Secret("test-signing-key"),),
        api_keys=(Secret(API_KEY),),
        notify_secret=Secret(NOTIFY_SECRET),
        allow_private_urls=True,
        mirror_assets=False,
        asset_dir=tmp_path / "assets",
        provider_timeout=5.0,
    )
    return base.replace(**overrides)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "store.db")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@asynccontextmanager
async def postgres_database() -> AsyncIterator[str]:
    """RECEIVER_TEST_POSTGRES_URL with a fresh schema of a random name (`?schema=`), dropped
    afterwards, so parallel runs and leftovers never meet. Unreachable is a failure, not a skip."""
    if not POSTGRES_URL:
        pytest.skip(needs_postgres.kwargs["reason"])
    schema = f"receiver_test_{secrets.token_hex(6)}"
    parts = urlsplit(POSTGRES_URL)
    url = urlunsplit(parts._replace(query="&".join(filter(None, [parts.query, urlencode({"schema": schema})]))))
    try:
        admin = await asyncpg.connect(POSTGRES_URL, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"RECEIVER_TEST_POSTGRES_URL is set but PostgreSQL cannot be reached: {exc!r}")
    try:
        yield url
    finally:
        try:
            await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await admin.close()


@pytest.fixture
def database(request: pytest.FixtureRequest) -> str:
    """The database the `running` receiver uses: "sqlite" unless a test parametrises it
    (`@pytest.mark.parametrize("database", ["sqlite", "postgres"], indirect=True)`)."""
    return getattr(request, "param", "sqlite")


@asynccontextmanager
async def database_for(kind: str, sqlite_file: Path) -> AsyncIterator[str]:
    """A database URL of `kind`: a fresh PostgreSQL schema (postgres_database), or `sqlite_file`."""
    if kind == "postgres":
        async with postgres_database() as url:
            yield url
    else:
        yield f"sqlite:///{sqlite_file}"


@pytest.fixture
async def database_url(database: str, tmp_path: Path) -> AsyncIterator[str]:
    async with database_for(database, tmp_path / "receiver.db") as url:
        yield url


@dataclass
class Running:
    """A receiver served on a real socket, and an authenticated client for it."""

    url: str
    app: Starlette
    api: httpx.AsyncClient
    settings: Settings

    @property
    def ctx(self) -> Context:
        ctx: Context = self.app.state.ctx
        return ctx

    async def post_callback(self, callback_url: str, body: Any = None, *, content: bytes | None = None,
                            headers: dict[str, str] | None = None) -> httpx.Response:
        async with httpx.AsyncClient(timeout=10) as raw:
            if content is None:
                return await raw.post(callback_url, json=body, headers=headers)
            return await raw.post(callback_url, content=content, headers=headers)


def _no_server_errors(response: httpx.Response) -> None:
    # 502 is the contract's answer to a provider refusal; anything else 5xx is a defect.
    assert response.status_code < 500 or response.status_code == 502, (
        f"{response.request.method} {response.request.url.path} answered {response.status_code}"
    )


@pytest.fixture
async def fake_provider() -> AsyncIterator[tuple[FakeProvider, str]]:
    fake = FakeProvider(delay=0.05, seed=1)
    async with serve_in_background(fake.app) as url:
        yield fake, url


@pytest.fixture
async def running(tmp_path: Path, fake_provider: tuple[FakeProvider, str], database_url: str) -> AsyncIterator[Running]:
    async with start_receiver(tmp_path, provider_url=fake_provider[1], database_url=database_url) as running:
        yield running


@asynccontextmanager
async def start_receiver(tmp_path: Path, *, provider_url: str = "http://127.0.0.1:9", clock: Clock | None = None,
                         **overrides: Any) -> AsyncIterator[Running]:
    """The receiver on an ephemeral port, its public URL pointing at itself: xhuoapi, xenodia and the
    router at `provider_url` (`providers` adds to or replaces them)."""
    port = free_port()
    providers = {name: ProviderSettings(url=provider_url, api_key=Secret("provider-key"))
                 for name in ("xhuoapi", "xenodia", "router")}
    providers.update(overrides.pop("providers", {}))
    settings = make_settings(tmp_path, public_url=f"http://127.0.0.1:{port}", providers=providers, **overrides)
    app = create_app(settings, clock=clock)
    async with serve_in_background(app, port=port) as url, httpx.AsyncClient(
        base_url=url,
        headers={"authorization": f"Bearer {API_KEY}"},
        timeout=30,
        event_hooks={"response": [_async(_no_server_errors)]},
    ) as api:
        yield Running(url=url, app=app, api=api, settings=settings)


def _async(check: Any) -> Any:
    async def hook(response: httpx.Response) -> None:
        check(response)

    return hook
