"""The HTTP seam deliveries go through.

    sender = AiohttpSender(guard=UrlGuard())        # guard=None: any address (private URLs allowed)
    answer = await sender.send(url, body, headers, timeout=10.0)
    await sender.aclose()

One shared keep-alive aiohttp session, separate from the providers' httpx
client: redirects are never followed, proxies from the environment are
ignored (a proxy would connect on the receiver's behalf, past the guard),
cookies are not kept, and with a guard every new connection resolves the host
off the event loop, checks every address and connects to a checked one — the
name is not looked up again in between, so a DNS rebind cannot slip through;
an address written in the URL is checked before the request. TLS still
verifies the certificate against the URL's host name. `Sender` is the seam:
the dispatcher never sees which client is behind it.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult

from receiver import __version__
from receiver.delivery.urlguard import UrlGuard, literal_address
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


class GuardedResolver(AbstractResolver):
    """Resolves host names for new connections through the guard: every address is checked
    and only checked addresses are returned, so the connection goes to one of them."""

    def __init__(self, guard: UrlGuard) -> None:
        self.guard = guard

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = await self.guard.addresses(host, port)  # UrlNotAllowed passes through
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
            for address in addresses
        ]

    async def close(self) -> None:
        return None


def guarded_session(
    guard: UrlGuard | None, *, limit: int, headers: Mapping[str, str], auto_decompress: bool = True
) -> aiohttp.ClientSession:
    """An aiohttp session that may only reach what `guard` allows (None: anything): every new
    connection resolves through the guard (no DNS cache, so no stale answer skips the check),
    proxies from the environment are ignored (a proxy would connect on the receiver's behalf,
    past the guard) and no cookies are kept. Deliveries and asset downloads both use it."""
    connector = aiohttp.TCPConnector(
        limit=limit,
        keepalive_timeout=30,
        use_dns_cache=guard is None,
        resolver=GuardedResolver(guard) if guard is not None else None,
    )
    return aiohttp.ClientSession(
        connector=connector,
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=auto_decompress,
        headers=dict(headers),
    )


def guard_refusal(exc: aiohttp.ClientConnectorError) -> UrlNotAllowed | None:
    """The guard's refusal behind a failed connect (GuardedResolver raised it), if that is what it was."""
    cause = exc.__cause__ or exc.os_error
    return cause if isinstance(cause, UrlNotAllowed) else None


class AiohttpSender:
    """The default Sender (see the module docstring).

    aiohttp rather than httpx here, by measurement (bench/README.md): httpcore's pool scans
    every pooled connection on every request, which with many subscribers and keep-alive
    connections capped deliveries at a few hundred per second.
    """

    def __init__(self, *, guard: UrlGuard | None = None, max_connections: int = 512) -> None:
        self.guard = guard
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Built on first use: a session belongs to the running event loop.
        if self._session is None:
            self._session = guarded_session(
                self.guard,
                limit=self.max_connections,
                headers={"user-agent": f"receiver-webhooks/{__version__}"},
                auto_decompress=False,
            )
        return self._session

    async def send(self, url: str, body: bytes, headers: Mapping[str, str], *, timeout: float) -> Answer:
        started = time.perf_counter()

        def elapsed() -> float:
            return (time.perf_counter() - started) * 1000

        try:
            async with asyncio.timeout(timeout):
                await self._check_literal(url)
                async with self._client().post(url, data=body, headers=headers, allow_redirects=False) as response:
                    kept = await response.content.read(RESPONSE_BODY_LIMIT)
                    if not response.content.at_eof():
                        response.close()  # the rest is not read: the connection is closed rather than reused
                    status = response.status
                    retry_after = response.headers.get("retry-after")
        except TimeoutError:
            return Answer(None, elapsed(), error=f"timeout: no answer within {timeout:g}s")
        except UrlNotAllowed as exc:
            return Answer(None, elapsed(), error=f"url_not_allowed: {exc}")
        except aiohttp.ClientConnectorError as exc:
            refused = guard_refusal(exc)
            if refused is not None:
                return Answer(None, elapsed(), error=f"url_not_allowed: {refused}")
            cause = exc.__cause__ or exc.os_error
            if isinstance(cause, socket.gaierror) or isinstance(exc, aiohttp.ClientConnectorDNSError):
                return Answer(None, elapsed(), error=f"connection failed: cannot resolve {exc.host}: {cause}")
            return Answer(None, elapsed(), error=f"connection failed: {exc.os_error or exc}")
        except (aiohttp.ClientError, ValueError, OSError) as exc:
            return Answer(None, elapsed(), error=f"{type(exc).__name__}: {exc}"[:300])
        error = None
        if 300 <= status < 400:
            error = f"HTTP {status}: redirects are not followed"
        elif not 200 <= status < 300:
            error = f"HTTP {status}"
        return Answer(status, elapsed(), error=error, body=kept.decode("utf-8", "replace"), retry_after=retry_after)

    async def _check_literal(self, url: str) -> None:
        """aiohttp connects to an IP written in the URL without resolving it: check it here."""
        if self.guard is None:
            return
        parsed = yarl.URL(url)
        host = parsed.raw_host or ""
        if literal_address(host.strip("[]")) is not None:
            await self.guard.addresses(host.strip("[]"), parsed.port or 0)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
