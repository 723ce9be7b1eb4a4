"""An in-process receiver for tests whose subject is the API's own logic (validation, answers)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from receiver.app import create_app
from tests.conftest import API_KEY, Running, _async, _no_server_errors, make_settings


@pytest.fixture
async def local(tmp_path: Path) -> AsyncIterator[Running]:
    """The app with its lifespan, called through httpx.ASGITransport (no socket, no provider)."""
    settings = make_settings(tmp_path)
    app = create_app(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://receiver",
        headers={"authorization": f"Bearer {API_KEY}"},
        event_hooks={"response": [_async(_no_server_errors)]},
    ) as api:
        yield Running(url="http://receiver", app=app, api=api, settings=settings)
