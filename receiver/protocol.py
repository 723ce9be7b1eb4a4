"""What the receiver asks of uvicorn, and what it adds where uvicorn has no setting.

    uvicorn.Config(app, **server_options(settings))

uvicorn bounds an idle keep-alive connection (`timeout_keep_alive`) and a
request head that arrives in pieces (h11's `max_incomplete_event_size`, answered
400), but a client that opens a connection and sends nothing, or trickles its
head a byte at a time, holds a connection (and a file descriptor) for ever,
and a body may be sent as slowly as a client likes. So:

- `GuardedH11Protocol`: a request's head must arrive within `header_timeout`
  seconds of the connection opening or the previous response ending (else
  `408` and the connection is closed), and may be at most `max_header_bytes`
  long (else `431 request_header_fields_too_large`, closed) — whether it
  arrives in one piece or many; a request answered before its body was read
  (`413`) has the rest of its body dropped for at most LINGER_SECONDS, then
  the connection closes (a "lingering close": the client reads the answer,
  not a reset, and cannot keep the connection busy sending into the void);
- `BodyDeadline` (ASGI middleware): a request's whole body must arrive within
  `body_timeout` seconds of its head (else `408 request_timeout`, closed).
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import h11
import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from receiver.config import Settings
from receiver.errors import RequestTimeout
from receiver.logs import get_logger, redact_path

log = get_logger("receiver.protocol")

_HEAD_END = b"\r\n\r\n"
#: Seconds a body still arriving after its request was answered (413) is read and dropped before
#: the connection closes: long enough for the client to read the answer instead of a reset.
LINGER_SECONDS = 2.0


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn.Config keyword arguments for the receiver's limits and timeouts (see the module)."""
    return {
        "http": functools.partial(
            GuardedH11Protocol, header_timeout=settings.header_timeout, max_header_bytes=settings.max_header_bytes
        ),
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "timeout_keep_alive": settings.keep_alive_timeout,
        "timeout_graceful_shutdown": settings.shutdown_timeout,
    }


def _refusal(status: int, reason: str, code: str, message: str) -> bytes:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head and a bound on its size."""

    def __init__(self, *args: Any, header_timeout: float, max_header_bytes: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.max_header_bytes = max_header_bytes
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._head_too_large(data):
            self._refuse(
                431,
                "Request Header Fields Too Large",
                "request_header_fields_too_large",
                f"The request line and headers are larger than {self.max_header_bytes} bytes.",
            )
            return
        lingering = self.conn.their_state is h11.SEND_BODY and self.conn.our_state is h11.DONE
        super().data_received(data)
        if lingering and self.conn.their_state is h11.IDLE:  # the unread body is over: on to the next request
            self._arm_head_timer()
        elif not lingering and self.conn.their_state is not h11.IDLE:  # the head is in: the app has the request
            self._disarm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE:
            self._arm_head_timer()  # the next request's head is due within the deadline too
        elif self.conn.their_state is h11.SEND_BODY:
            # Answered before the body was read (413): what still comes is discarded for a moment, so
            # the client reads the answer rather than a reset, then the connection closes.
            self._disarm_head_timer()
            self._head_timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def _head_too_large(self, data: bytes) -> bool:
        buffered = self.conn.trailing_data[0] if self.conn.trailing_data[0] else b""
        pending = buffered + data if buffered else data
        end = pending.find(_HEAD_END)
        size = len(pending) if end < 0 else end + len(_HEAD_END)
        return size > self.max_header_bytes

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_overdue)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_overdue(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a response is still being written (pipelining): not this timer's business
        started = bool(self.conn.trailing_data[0])
        log.info("http.head_timeout", client=self.client[0] if self.client else None, partial=started)
        if started:
            self._refuse(
                408,
                "Request Timeout",
                "request_timeout",
                f"The request head did not arrive within {self.header_timeout:g} seconds.",
            )
        else:
            self.transport.close()  # an idle connection: nothing to answer

    def _refuse(self, status: int, reason: str, code: str, message: str) -> None:
        self._disarm_head_timer()
        self.transport.write(_refusal(status, reason, code, message))
        self.transport.close()


class BodyDeadline:
    """ASGI middleware: a request's body must arrive within `seconds` of its head (408 otherwise)."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        body_done = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:  # what follows is the wait for a disconnect: no deadline
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                body_done = True
                log.info("http.body_timeout", path=redact_path(scope.get("path", "")))
                raise RequestTimeout(
                    f"The request body did not arrive within {self.seconds:g} seconds.",
                    details={"limit_seconds": self.seconds},
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self.app(scope, timed_receive, send)
