"""Running ASGI apps on real sockets: `receiver serve`, and in-process for tests and the demo.

async with serve_in_background(app) as base_url:    # 127.0.0.1, an ephemeral port
    ...
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from receiver.config import Settings
from receiver.protocol import server_options


def begin_draining(app: object, grace: float | None = None) -> None:
    """Tell an app's long-lived responses (SSE streams) to finish: the server is stopping.

    The receiver's lifespan puts an asyncio.Event at `app.state.draining`; other apps are left alone.
    `grace`: the seconds the server gives requests in flight; the lifespan gives deliveries in
    flight what is left of them (`app.state.stop_by`, loop time), so the whole stop keeps one deadline.
    """
    state = getattr(app, "state", None)
    event = getattr(state, "draining", None)
    if isinstance(event, asyncio.Event):
        if grace is not None and not event.is_set():
            state.stop_by = asyncio.get_running_loop().time() + grace  # type: ignore[union-attr]
        event.set()


class Server(uvicorn.Server):
    """uvicorn's server, which lets streaming responses end cleanly before it waits for them."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        begin_draining(self.config.app, self.config.timeout_graceful_shutdown)
        await super().shutdown(sockets=sockets)


class _QuietServer(Server):
    """An in-process server leaves the process's signal handlers alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def uvicorn_config(app: ASGIApp | str, **overrides: Any) -> uvicorn.Config:
    """uvicorn settings the receiver always wants (its own redacted access log, no server header),
    and for a receiver app (`create_app` keeps its settings at `app.state.settings`) its limits
    and timeouts (receiver.protocol)."""
    options: dict[str, Any] = {
        "log_config": None,
        "access_log": False,
        "server_header": False,
        "lifespan": "on",
        "timeout_graceful_shutdown": 10,
    }
    settings = getattr(getattr(app, "state", None), "settings", None)
    if isinstance(settings, Settings):
        options.update(server_options(settings))
    options.update(overrides)
    return uvicorn.Config(app, **options)


@contextlib.asynccontextmanager
async def serve_in_background(app: ASGIApp, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve `app` on a real socket inside this event loop; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    server = _QuietServer(uvicorn_config(app))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()  # raises what stopped it
                raise RuntimeError("the server stopped before starting")
            await asyncio.sleep(0.005)
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now (for starting another process on it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
