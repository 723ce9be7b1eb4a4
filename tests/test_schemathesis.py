"""The API against its own OpenAPI document (schemathesis), on a real socket, with the API key.

Every operation of /openapi.json is called with generated data, valid and not: no answer is a
5xx (502 only as the contract's provider refusal, carrying the failed task), and every answer
conforms to the document — status codes, content types and response schemas. The endless
streams (`/v1/tasks/{id}/events`, `/v1/stream`) are left out: they never end by design.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import ignored_auth, positive_data_acceptance

from receiver.fakes.provider import FakeProvider
from receiver.server import serve_in_background
from tests.conftest import API_KEY, start_receiver

AUTH = {"authorization": f"Bearer {API_KEY}"}
STREAMS = r"(/events|/stream)$"
#: Generated calls per operation: ~20 operations stay well under a minute.
EXAMPLES = 25


class Background:
    """The receiver (and a fake provider) served from their own thread and event loop, so
    schemathesis's synchronous client can call them for the whole module."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.url = ""
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            fake = FakeProvider(delay=0.05, seed=1)
            async with serve_in_background(fake.app) as provider_url, start_receiver(
                self.tmp_path, provider_url=provider_url
            ) as running:
                self.url = running.url
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:  # surfaced to the test thread
            self._error = exc
            self._ready.set()

    def __enter__(self) -> Background:
        self._thread.start()
        assert self._ready.wait(30), "the receiver did not start"
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


@pytest.fixture(scope="module")
def receiver_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with Background(tmp_path_factory.mktemp("schemathesis")) as background:
        yield background.url


@pytest.fixture(scope="module")
def api_schema(receiver_url: str) -> Any:
    loaded = schemathesis.openapi.from_url(f"{receiver_url}/openapi.json", headers=AUTH)
    loaded.config.base_url = receiver_url
    return loaded.exclude(path_regex=STREAMS)


def check(case: Any, receiver_url: str) -> None:
    response = case.call_and_validate(
        base_url=receiver_url,
        headers=AUTH,
        timeout=15,
        # A 502 is the contract's answer to a provider refusal (checked below); valid data may
        # still be refused by the fake provider or the model rules, which the schema cannot say.
        excluded_checks=[schemathesis.checks.not_a_server_error, positive_data_acceptance, ignored_auth],
    )
    assert response.status_code < 500 or response.status_code == 502, (response.status_code, response.text[:300])
    if response.status_code == 502:
        body = response.json()
        assert body["error"]["code"] and body["task"]["state"] == "failed", body
    content_type = (response.headers.get("content-type") or [""])[0]  # schemathesis: header -> values
    if response.status_code >= 400 and content_type.startswith("application/json"):
        error = response.json()["error"]
        assert isinstance(error["code"], str) and isinstance(error["message"], str)


def test_the_api_keeps_its_own_contract(api_schema: Any, receiver_url: str) -> None:
    """Each operation in turn, with a bounded number of examples (schemathesis's pytest plugin
    parametrisation does not run under pytest 9, so the operations are walked here)."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) > 15
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case: Any) -> None:
            check(case, receiver_url)

        try:
            run()
        except Exception as exc:
            exc.add_note(f"operation: {operation.method.upper()} {operation.path}")
            raise


def test_the_streams_are_the_only_operations_left_out(api_schema: Any) -> None:
    """The exclusion is narrow: every other documented operation is exercised."""
    full = schemathesis.openapi.from_dict(api_schema.raw_schema)
    every = {(op.ok().method.upper(), op.ok().path) for op in full.get_all_operations()}
    kept = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    # schemathesis leaves out the document it was loaded from (/openapi.json) by itself.
    assert every - kept - {("GET", "/openapi.json")} == {("GET", "/v1/tasks/{task_id}/events"), ("GET", "/v1/stream")}
    assert len(kept) > 15
