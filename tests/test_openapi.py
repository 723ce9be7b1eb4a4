"""The hand-written OpenAPI document names every route the app serves."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from starlette.routing import Mount, Route

from receiver.app import create_app
from receiver.openapi import PATHS, document
from tests.conftest import make_settings


def served(routes, prefix: str = "") -> set[tuple[str, str]]:
    found = set()
    for route in routes:
        if isinstance(route, Mount):
            found |= served(route.routes, prefix + route.path)
        elif isinstance(route, Route):
            path = prefix + route.path
            path = path.rstrip("/") or "/"  # a trailing slash is an alias of the path without (callbacks)
            found |= {(path, method.lower()) for method in route.methods or () if method != "HEAD"}
    return found


def test_every_route_is_documented(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path))
    documented = {(path, method) for path, item in PATHS.items() for method in item}
    assert served(app.routes) <= documented, served(app.routes) - documented


def test_submissions_take_json_or_multipart() -> None:
    body = document("http://x")["paths"]["/v1/tasks"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert "413" in document("http://x")["paths"]["/v1/tasks"]["post"]["responses"]


@pytest.mark.anyio
async def test_every_management_route_needs_a_key(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://receiver"
    ) as anonymous:
        for path, method in sorted(served(app.routes)):
            if not path.startswith("/v1/"):
                continue
            concrete = re.sub(r"\{(\w+)\}", "x", path)
            answer = await anonymous.request(method, concrete, headers={"authorization": "Bearer wrong"})
            assert answer.status_code == 401 and answer.json()["error"]["code"] == "unauthorized", (method, path)
