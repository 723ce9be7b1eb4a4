"""A small client for a running receiver's management API (what the CLI uses).

with Client("http://127.0.0.1:8000", api_key) as api:
    task = api.submit({"provider": "xhuoapi", "model": "gpt-image-2", "prompt": "…"})
    task = api.task(task["id"], wait=30)
    failed = api.deliveries(status="failed")
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import orjson

from receiver.config import Settings


class ClientError(Exception):
    """The receiver answered with an error (or could not be reached)."""

    def __init__(self, message: str, *, status: int | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


def default_api_key(environ: Mapping[str, str]) -> str | None:
    """RECEIVER_API_KEY, else the first of RECEIVER_API_KEYS, else the generated one in the data folder."""
    if environ.get("RECEIVER_API_KEY"):
        return environ["RECEIVER_API_KEY"]
    if environ.get("RECEIVER_API_KEYS"):
        return environ["RECEIVER_API_KEYS"].split(",")[0].strip()
    try:
        settings = Settings.from_env(environ)
    except Exception:
        return None
    path = Path(settings.data_dir) / "secrets.json"
    if path.exists():
        try:
            key = orjson.loads(path.read_bytes()).get("api_key")
        except (OSError, orjson.JSONDecodeError):
            return None
        return key if isinstance(key, str) else None
    return None


def default_url(environ: Mapping[str, str] = os.environ) -> str:
    return environ.get("RECEIVER_URL", "http://127.0.0.1:8000").rstrip("/")


class Client:
    def __init__(self, base_url: str, api_key: str | None, *, timeout: float = 90.0) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach the receiver at {self._http.base_url}: {exc}") from exc
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if response.status_code >= 400:
            message = f"HTTP {response.status_code}"
            if isinstance(body, dict) and isinstance(body.get("error"), dict):
                message = f"{body['error'].get('code')}: {body['error'].get('message')}"
            raise ClientError(message, status=response.status_code, body=body)
        return body

    def submit(self, body: Mapping[str, Any], *, idempotency_key: str | None = None) -> Any:
        headers = {"idempotency-key": idempotency_key} if idempotency_key else {}
        return self.request("POST", "/v1/tasks", json=dict(body), headers=headers)

    def task(self, task_id: str, *, wait: float = 0) -> Any:
        params = {"wait": wait} if wait else {}
        return self.request("GET", f"/v1/tasks/{task_id}", params=params)

    def tasks(self, **filters: Any) -> Any:
        return self.request("GET", "/v1/tasks", params={k: v for k, v in filters.items() if v is not None})

    def callback_url(self, provider: str, *, expires_in: int | None = None) -> Any:
        body: dict[str, Any] = {"provider": provider}
        if expires_in:
            body["expires_in"] = expires_in
        return self.request("POST", "/v1/callback-urls", json=body)

    def deliveries(self, **filters: Any) -> Any:
        return self.request("GET", "/v1/deliveries", params={k: v for k, v in filters.items() if v is not None})

    def redeliver(self, delivery_id: str) -> Any:
        return self.request("POST", f"/v1/deliveries/{delivery_id}/retry")
