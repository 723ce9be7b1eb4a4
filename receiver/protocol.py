"""What the receiver asks of uvicorn, and what it adds where uvicorn has no setting.

    uvicorn.Config(app, **server_options(settings))

uvicorn bounds an idle keep-alive connection (`timeout_keep_alive`), but a
client that opens a connection and sends nothing, or trickles its head a byte
at a time, holds a connection (and a file descriptor) for ever; its
httptools parser takes a head of any size; and a body may be sent as slowly as
a client likes. So:

- `GuardedHttpToolsProtocol`: a request's head must arrive within
  `header_timeout` seconds of the connection opening or, on a kept-alive
  connection, of its first byte (else `408` and the connection is closed; an
  idle kept-alive connection is uvicorn's `timeout_keep_alive` to close), and may be at most
  `max_header_bytes` long (else `431 request_header_fields_too_large`, closed)
  — whether it arrives in one piece or many; a request answered before its
  body was read (`413`) has the rest of its body dropped for at most
  LINGER_SECONDS, then the connection closes (a "lingering close": the client
  reads the answer, not a reset, and cannot keep the connection busy sending
  into the void);
  and a request's whole body must arrive within `body_timeout` seconds of its
  head (else `408 request_timeout` if it has not been answered yet, and the
  connection is closed; the route waiting for the body sees a disconnect). The
  timer is armed only for a body that does not come with its head, so a
  callback that arrives in one read costs nothing.

The protocol is uvicorn's httptools one (a C parser), not its pure-Python h11
one: callback ingest is the hot path, and with the same guards httptools serves it about 8 % faster
(bench/README.md).
"""

from __future__ import annotations

import asyncio
import functools
from http import HTTPStatus
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from receiver.config import Settings
from receiver.errors import BODY_TIMED_OUT, ApiError, HeaderFieldsTooLarge, InvalidRequest, RequestTimeout
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
            GuardedHttpToolsProtocol,
            header_timeout=settings.header_timeout,
            max_header_bytes=settings.max_header_bytes,
            body_timeout=settings.body_timeout,
        ),
        "timeout_keep_alive": settings.keep_alive_timeout,
        "timeout_graceful_shutdown": settings.shutdown_timeout,
    }


def _refusal(error: ApiError) -> bytes:
    """A whole HTTP/1.1 answer for `error` in the contract's error shape, closing the connection
    (written by the protocol itself: the request never reached the app)."""
    body = orjson.dumps(error.body())
    head = (
        f"HTTP/1.1 {error.status_code} {HTTPStatus(error.status_code).phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def _cancelled(timer: asyncio.TimerHandle | None) -> asyncio.TimerHandle | None:
    """Cancel `timer` if it is set; what the attribute that held it holds now (None)."""
    if timer is not None:
        timer.cancel()
    return None


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with deadlines for each request's head and body, and a bound on
    the head's size."""

    def __init__(
        self, *args: Any, header_timeout: float, max_header_bytes: int, body_timeout: float, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.max_header_bytes = max_header_bytes
        self.body_timeout = body_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._awaiting_head = True  # the last request was read whole: the next bytes are a head
        self._head_bytes = 0  # of the head being received

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_timer = _cancelled(self._head_timer)
        self._body_timer = _cancelled(self._body_timer)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._awaiting_head:
            if self._head_timer is None:  # the first bytes of a head after a response: its deadline starts
                self._arm_head_timer()
            end = data.find(_HEAD_END)  # a terminator split across reads is found by the parser: ≤ 3 bytes off
            self._head_bytes += len(data) if end < 0 else end + len(_HEAD_END)
            if self._head_bytes > self.max_header_bytes:
                self._refuse(
                    HeaderFieldsTooLarge(f"The request line and headers are larger than {self.max_header_bytes} bytes.")
                )
                return
        super().data_received(data)
        # A head in and its body not whole (a body sent with its head never gets here): the deadline
        # runs from now, the head's arrival. A pipelined request waiting for the one ahead of it is not
        # read meanwhile (uvicorn pauses reading): its deadline starts when it does (on_response_complete).
        if not self._awaiting_head and self._body_timer is None and not self.pipeline:
            self._arm_body_timer()

    def _arm_body_timer(self) -> None:
        if not self.transport.is_closing() and self.cycle is not None and not self.cycle.response_complete:
            self._body_timer = self.loop.call_later(self.body_timeout, self._body_overdue)

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        self._head_bytes = 0
        self._head_timer = _cancelled(self._head_timer)  # the head is in: the app has the request
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._awaiting_head = True
        self._body_timer = _cancelled(self._body_timer)
        if self.cycle is not None and self.cycle.response_complete:
            self._arm_head_timer()  # the body of a request already answered is over (see on_response_complete)

    def on_response_complete(self) -> None:
        queued = bool(self.pipeline)  # a pipelined request is started now: the bytes still coming are its
        super().on_response_complete()
        self._body_timer = _cancelled(self._body_timer)  # answered: a body still coming is the lingering close's
        if self.transport.is_closing():
            return
        if self._awaiting_head:
            # Idle until the next request: uvicorn's keep-alive timeout (RECEIVER_KEEP_ALIVE_TIMEOUT)
            # closes the connection; the head deadline starts with the head's first bytes.
            self._head_timer = _cancelled(self._head_timer)
        elif queued:
            # The last head read belongs to a request that waited behind this one; if it is the one
            # started now, its body's deadline starts now (else when its own turn comes).
            if not self.pipeline:
                self._arm_body_timer()
        else:
            # Answered before the body was read (413): what still comes is discarded for a moment, so
            # the client reads the answer rather than a reset, then the connection closes.
            self._head_timer = _cancelled(self._head_timer)
            self._head_timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def _arm_head_timer(self) -> None:
        self._head_timer = _cancelled(self._head_timer)
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_overdue)

    def _head_overdue(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._awaiting_head:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a response is still being written (pipelining): not this timer's business
        started = self._head_bytes > 0
        log.info("http.head_timeout", client=self.client[0] if self.client else None, partial=started)
        if started:
            self._refuse(RequestTimeout(f"The request head did not arrive within {self.header_timeout:g} seconds."))
        else:
            self.transport.close()  # an idle connection: nothing to answer

    def _body_overdue(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self._awaiting_head or self.cycle is None:
            return
        log.info("http.body_timeout", path=redact_path(self.cycle.scope.get("path", "")))
        if self.cycle.response_started:  # an answer is being written: cut it off
            self.transport.close()
            return
        error = RequestTimeout(
            f"The request body did not arrive within {self.body_timeout:g} seconds.",
            details={"limit_seconds": self.body_timeout},
        )
        self.cycle.scope[BODY_TIMED_OUT] = error  # type: ignore[literal-required]  # the app sees a disconnect
        self._refuse(error)

    def _refuse(self, error: ApiError) -> None:
        self._head_timer = _cancelled(self._head_timer)
        self._body_timer = _cancelled(self._body_timer)
        self.transport.write(_refusal(error))
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """A request the parser cannot read (uvicorn answers those in plain text): the contract's shape."""
        self._refuse(InvalidRequest(f"The request is not valid HTTP/1.1: {msg}"))
