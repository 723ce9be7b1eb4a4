"""The hand-written OpenAPI document names every route the app serves."""

from __future__ import annotations

from pathlib import Path

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
            found |= {(prefix + route.path, method.lower()) for method in route.methods or () if method != "HEAD"}
    return found


def test_every_route_is_documented(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path))
    documented = {(path, method) for path, item in PATHS.items() for method in item}
    assert served(app.routes) <= documented, served(app.routes) - documented


def test_submissions_take_json_or_multipart() -> None:
    body = document("http://x")["paths"]["/v1/tasks"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert "413" in document("http://x")["paths"]["/v1/tasks"]["post"]["responses"]
