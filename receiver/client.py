"""A small client for a running receiver's management API (what the CLI uses).

with Client("http://127.0.0.1:8000", api_key) as api:
    task = api.submit({"provider": "xhuoapi", "model": "gpt-image-2", "prompt": "…"})
    task = api.task(task["id"], wait=30)
    failed = api.deliveries(status="failed")

async for task in follow("http://127.0.0.1:8000", api_key, "tsk_…"):   # each change, live (SSE)
    ...
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

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
        self.base_url = base_url
        self.api_key = api_key
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._http.close()

    def request(self, method: str, path: str, *, expect: tuple[str, ...] = (), **kwargs: Any) -> Any:
        """The JSON object the receiver answered; ClientError if it refused, could not be reached, or
        what answered is not the receiver (not a JSON object, or without the `expect`ed keys: a
        wrong port, a tunnel's warning page, a proxy)."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach the receiver at {self._http.base_url}: {exc}") from exc
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if response.status_code >= 400:
            raise refused(response.status_code, body, self._http.base_url)
        if not isinstance(body, dict) or any(key not in body for key in expect):
            kind = response.headers.get("content-type", "no content type")
            raise ClientError(
                f"what answers at {self._http.base_url} is not the receiver (HTTP {response.status_code}, {kind}, "
                f"not the answer {method} {path} gives): check RECEIVER_URL",
                status=response.status_code,
                body=body,
            )
        return body

    def submit(self, body: Mapping[str, Any], *, idempotency_key: str | None = None) -> Any:
        headers = {"idempotency-key": idempotency_key} if idempotency_key else {}
        return self.request("POST", "/v1/tasks", json=dict(body), headers=headers, expect=_TASK)

    def task(self, task_id: str, *, wait: float = 0) -> Any:
        params = {"wait": wait} if wait else {}
        return self.request("GET", f"/v1/tasks/{_segment(task_id)}", params=params, expect=_TASK)

    def tasks(self, **filters: Any) -> Any:
        params = {k: v for k, v in filters.items() if v is not None}
        return self.request("GET", "/v1/tasks", params=params, expect=_PAGE)

    def callback_url(self, provider: str, *, expires_in: int | None = None) -> Any:
        body: dict[str, Any] = {"provider": provider}
        if expires_in is not None:  # the receiver says what it takes (60 s to a year)
            body["expires_in"] = expires_in
        return self.request("POST", "/v1/callback-urls", json=body, expect=("task", "callback_url"))

    def deliveries(self, **filters: Any) -> Any:
        params = {k: v for k, v in filters.items() if v is not None}
        return self.request("GET", "/v1/deliveries", params=params, expect=_PAGE)

    def redeliver(self, delivery_id: str) -> Any:
        return self.request("POST", f"/v1/deliveries/{_segment(delivery_id)}/retry", expect=("id", "status"))


_TASK = ("id", "state")
_PAGE = ("data",)


def _segment(value: str) -> str:
    """An id as one path segment: whatever it holds ("/", "..") cannot name another route."""
    return quote(value, safe="")


def refused(status: int, body: Any, base_url: object = None) -> ClientError:
    """The ClientError for an error answer: its message from the contract's error shape, or, for an
    answer in another shape, that what answered may not be the receiver."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = f"{body['error'].get('code')}: {body['error'].get('message')}"
    else:
        where = f" from {base_url}" if base_url else ""
        message = f"HTTP {status}{where}, not in the receiver's error shape: is RECEIVER_URL the receiver?"
    return ClientError(message, status=status, body=body)


def settled(task: Mapping[str, Any]) -> bool:
    """Terminal, with its images kept (or mirroring given up): nothing more will change."""
    result = task.get("result") or {}
    return task.get("state") in ("succeeded", "failed", "expired", "cancelled") and result.get("mirror") != "pending"


async def follow(
    base_url: str, api_key: str | None, task_id: str, *, give_up_after: float = 30.0, retry_every: float = 1.0
) -> AsyncIterator[Any]:
    """The task at each change, from its Server-Sent Events (`GET /v1/tasks/{id}/events`), until it
    is settled; a dropped stream is opened again, every `retry_every` seconds. ClientError if the
    receiver refuses, or cannot be reached again within `give_up_after` seconds."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    # A quiet stream sends a heartbeat every 15 s: three missed ones mean the link is gone.
    timeout = httpx.Timeout(30.0, read=45.0)
    loop = asyncio.get_running_loop()
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout) as http:
        task: Any = None
        lost_at: float | None = None
        while task is None or not settled(task):
            try:
                async with http.stream("GET", f"/v1/tasks/{_segment(task_id)}/events") as response:
                    if response.status_code != 200:
                        await response.aread()
                        try:
                            body = response.json()
                        except ValueError:
                            body = response.text
                        raise refused(response.status_code, body, base_url)
                    lost_at = None
                    async for line in response.aiter_lines():
                        if line.startswith("data: "):
                            task = orjson.loads(line[6:])
                            yield task
            except httpx.TransportError as exc:  # the connection dropped: open the stream again
                lost_at = loop.time() if lost_at is None else lost_at
                if loop.time() - lost_at >= give_up_after:
                    raise ClientError(
                        f"lost the receiver at {base_url} while following task {task_id} "
                        f"(no answer for {give_up_after:g} s: {exc or type(exc).__name__})"
                    ) from exc
                await asyncio.sleep(retry_every)
