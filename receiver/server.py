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


def begin_draining(app: object) -> None:
    """Tell an app's long-lived responses (SSE streams) to finish: the server is stopping.

    The receiver's lifespan puts an asyncio.Event at `app.state.draining`; other apps are left alone.
    """
    event = getattr(getattr(app, "state", None), "draining", None)
    if isinstance(event, asyncio.Event):
        event.set()


class Server(uvicorn.Server):
    """uvicorn's server, which lets streaming responses end cleanly before it waits for them."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        begin_draining(self.config.app)
        await super().shutdown(sockets=sockets)


class _QuietServer(Server):
    """An in-process server leaves the process's signal handlers alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def uvicorn_config(app: ASGIApp | str, **overrides: Any) -> uvicorn.Config:
    """uvicorn settings the receiver always wants (its own redacted access log, no server header)."""
    options: dict[str, Any] = {
        "log_config": None,
        "access_log": False,
        "server_header": False,
        "lifespan": "on",
        "timeout_graceful_shutdown": 10,
    }
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
