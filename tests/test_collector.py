"""`receiver serve` settles Python's cycle collector once its app has started (each worker of
`--workers N` too); in-process servers (tests, the demo) leave their process's collector alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from receiver import app as app_module
from receiver.app import app_from_env, create_app
from receiver.server import serve_in_background
from tests.conftest import make_settings

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


async def test_a_serving_app_settles_its_collector_after_start_up_and_others_do_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(app_module, "settle_collector", lambda: calls.append("settled"))
    served = create_app(make_settings(tmp_path / "served"))
    served.state.settles_collector = True  # what `receiver serve` sets
    async with serve_in_background(served):
        assert calls == ["settled"]  # once, when its lifespan had started the store and workers
    async with serve_in_background(create_app(make_settings(tmp_path / "test"))):
        assert calls == ["settled"]  # not again: a test's process keeps Python's defaults


def test_each_worker_app_is_marked_as_serving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECEIVER_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("RECEIVER_DATABASE_URL", f"sqlite:///{tmp_path}/receiver.db")
    monkeypatch.setattr(app_module, "configure_logging", lambda level: None)  # leave this process's logging be
    assert app_from_env().state.settles_collector is True
