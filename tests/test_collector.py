"""`receiver serve` settles Python's cycle collector once it has started; in-process servers
(tests, the demo) leave their process's collector alone."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import Iterator

import pytest
from starlette.applications import Starlette

from receiver import server
from receiver.server import Server, serve_in_background, uvicorn_config
from tests.delivery.helpers import eventually

pytestmark = pytest.mark.anyio


def test_settling_freezes_what_is_alive_and_raises_the_young_threshold() -> None:
    code = (
        "import gc; from receiver.collector import settle_collector; before = gc.get_freeze_count();"
        " settle_collector(); print(before, gc.get_freeze_count(), *gc.get_threshold())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    before, frozen, young, *_ = map(int, out)
    assert before == 0 and frozen > 1000  # modules, classes, functions: out of every later collection
    assert young == 50_000


class _Served(Server):
    """`receiver serve`'s server, but leaving this test process's signal handlers alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def test_the_serving_process_settles_its_collector_once_started(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(server, "settle_collector", lambda: calls.append("settled"))
    served = _Served(uvicorn_config(Starlette(), host="127.0.0.1", port=0, lifespan="off"))
    running = asyncio.create_task(served.serve())
    async def started() -> bool:
        return served.started

    await eventually(started, what="the server to start")
    served.should_exit = True
    await running
    assert calls == ["settled"]
    async with serve_in_background(Starlette()):
        assert calls == ["settled"]  # not again: a test's process keeps Python's defaults
