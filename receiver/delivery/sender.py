"""The HTTP seam deliveries go through.

    sender = HttpxSender(guard=UrlGuard())          # guard=None: any address (private URLs allowed)
    answer = await sender.send(url, body, headers, timeout=10.0)
    await sender.aclose()

One shared keep-alive `httpx.AsyncClient`, separate from the providers' client:
redirects are never followed, proxies from the environment are ignored (a proxy
would connect on the receiver's behalf, past the guard), and with a guard every
new connection resolves the host off the event loop, checks every address and
connects to a checked one — the name is not looked up again in between, so a
DNS rebind cannot slip through. TLS still verifies the certificate against the
URL's host name. `Sender` is the seam: a faster client can replace this one
without the dispatcher noticing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import httpcore
import httpx

from receiver import __version__
from receiver.delivery.urlguard import UrlGuard
from receiver.errors import UrlNotAllowed

#: How much of a subscriber's answer is kept on the attempt.
RESPONSE_BODY_LIMIT = 1024


@dataclass(frozen=True, slots=True)
class Answer:
    """How one request went: a status code, or an error when there was no usable answer."""

    status_code: int | None
    latency_ms: float
    error: str | None = None
    body: str | None = None  # the first RESPONSE_BODY_LIMIT bytes, decoded
    retry_after: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.status_code is not None and 200 <= self.status_code < 300


class Sender(Protocol):
    async def send(self, url: str, body: bytes, headers: Mapping[str, str], *, timeout: float) -> Answer:
        """POST `body`; never raises for anything the endpoint or the network does."""

    async def aclose(self) -> None: ...


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """Opens TCP connections only to addresses the guard has just checked."""

    def __init__(self, guard: UrlGuard, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self.guard = guard
        self.inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            addresses = await self.guard.addresses(host, port)  # UrlNotAllowed passes through
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self.inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not allowed")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport, with every connect going through `GuardedBackend`."""

    def __init__(self, guard: UrlGuard, *, limits: httpx.Limits) -> None:
        super().__init__(limits=limits, trust_env=False)
        # httpx builds its pool in __init__ without a way to pass a network backend: build it again with one.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=GuardedBackend(guard),
        )


class HttpxSender:
    """The default Sender (see the module docstring)."""

    def __init__(
        self,
        *,
        guard: UrlGuard | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 512,
    ) -> None:
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=min(max_connections, 128), keepalive_expiry=30
        )
        if transport is None:
            transport = (
                GuardedTransport(guard, limits=limits)
                if guard is not None
                else httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
            )
        self._client = httpx.AsyncClient(
            transport=transport,
            follow_redirects=False,
            trust_env=False,
            headers={"user-agent": f"receiver-webhooks/{__version__}"},
        )

    async def send(self, url: str, body: bytes, headers: Mapping[str, str], *, timeout: float) -> Answer:
        started = time.perf_counter()

        def elapsed() -> float:
            return (time.perf_counter() - started) * 1000

        try:
            async with asyncio.timeout(timeout):
                request = self._client.build_request("POST", url, content=body, headers=headers, timeout=timeout)
                response = await self._client.send(request, stream=True)
                try:
                    kept = bytearray()
                    async for chunk in response.aiter_bytes():
                        kept += chunk
                        if len(kept) >= RESPONSE_BODY_LIMIT:
                            break  # the rest is not read: the connection is closed rather than reused
                finally:
                    await response.aclose()
        except (TimeoutError, httpx.TimeoutException):
            return Answer(None, elapsed(), error=f"timeout: no answer within {timeout:g}s")
        except UrlNotAllowed as exc:
            return Answer(None, elapsed(), error=f"url_not_allowed: {exc}")
        except httpx.ConnectError as exc:
            return Answer(None, elapsed(), error=f"connection failed: {exc or type(exc).__name__}")
        except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
            return Answer(None, elapsed(), error=f"{type(exc).__name__}: {exc}"[:300])
        status = response.status_code
        error = None
        if response.is_redirect:
            error = f"HTTP {status}: redirects are not followed"
        elif not 200 <= status < 300:
            error = f"HTTP {status}"
        return Answer(
            status,
            elapsed(),
            error=error,
            body=bytes(kept[:RESPONSE_BODY_LIMIT]).decode("utf-8", "replace"),
            retry_after=response.headers.get("retry-after"),
        )

    async def aclose(self) -> None:
        await self._client.aclose()
