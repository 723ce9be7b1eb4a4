"""Which URLs the receiver may call: subscriber endpoints and notify_urls.

    guard = UrlGuard()                                  # allow_private=True turns it off
    await guard.check("https://hooks.example.com/x")    # UrlNotAllowed, at creation
    addresses = await guard.addresses("hooks.example.com", 443)   # at connect time

A URL must be http or https and its host must not be, or resolve to, a
loopback, private, link-local, shared (CGNAT), multicast, unspecified,
reserved or documentation address, nor a cloud metadata endpoint — IPv4 or
IPv6, looking inside IPv4-mapped, NAT64 and 6to4 addresses. Every address a
name resolves to is checked. DNS can change after a URL was accepted, so the
sender checks again when it opens a connection and connects to the address it
checked (see sender.py), which leaves no window for a DNS rebind.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Sequence

import httpx

from receiver.errors import UrlNotAllowed

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]

MAX_URL_LENGTH = 2048

#: Names that reach the machine itself or a cloud provider's metadata service.
BLOCKED_NAMES = frozenset(
    {
        "localhost",
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
    }
)

#: Checked before the generic categories, so the reason names the specific case.
_NETWORKS: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.ip_network(net), reason)
    for net, reason in (
        ("169.254.169.254/32", "cloud metadata"),  # AWS, GCP, Azure, DigitalOcean, …
        ("192.0.0.192/32", "cloud metadata"),  # Oracle Cloud (legacy)
        ("169.254.170.2/32", "cloud metadata"),  # AWS ECS task metadata
        ("fd00:ec2::254/128", "cloud metadata"),  # AWS over IPv6
        ("100.100.100.200/32", "cloud metadata"),  # Alibaba Cloud
        ("168.63.129.16/32", "cloud metadata"),  # Azure's platform endpoint (a public address)
        ("100.64.0.0/10", "shared address space (CGNAT)"),
        ("192.0.0.0/24", "IETF protocol assignment"),  # not globally reachable (Python's is_global lets it by)
        ("192.0.2.0/24", "documentation"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("2001:db8::/32", "documentation"),
        ("198.18.0.0/15", "benchmarking"),
        ("64:ff9b:1::/48", "local-use NAT64"),
        ("fec0::/10", "site-local"),
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_LEGACY_IPV4 = re.compile(r"^[0-9a-fx.]+$", re.IGNORECASE)  # 127.1, 0x7f.1, 2130706433
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)", re.IGNORECASE)  # one label of a DNS name (IDNA-encoded)


class MalformedUrl(ValueError):
    """Not an http(s) URL with a host a resolver takes; the message says what is wrong."""


def read_url(url: str) -> httpx.URL:
    """`url` as the receiver will call it; MalformedUrl unless it is http(s), has no spaces or
    control characters, and names a well-formed host (an IP address, or a DNS name whose labels
    are 1-63 letters, digits, `-` or `_`, not starting or ending with `-`) and a valid port."""
    if any(c.isspace() or not c.isprintable() for c in url):
        raise MalformedUrl("contains spaces or control characters")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise MalformedUrl("is not a valid URL") from exc
    if parsed.scheme not in ("http", "https") or not parsed.raw_host:
        raise MalformedUrl("must be an http:// or https:// URL with a host")
    if not _well_formed_host(parsed.raw_host.decode("ascii")):
        raise MalformedUrl("has a host name that is not valid")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise MalformedUrl("has a port outside 1-65535")
    return parsed


def _well_formed_host(host: str) -> bool:
    if ":" in host or literal_address(host) is not None:  # an IPv6 literal (httpx read it) or IPv4
        return True
    name = host[:-1] if host.endswith(".") else host
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


def refusal(address: IPAddress) -> str | None:
    """Why the receiver must not connect to `address` (None: it may)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            inner = refusal(embedded)
            return f"{inner} (inside an IPv6 address)" if inner else None
    for network, reason in _NETWORKS:
        if address in network:
            return reason
    for flag, reason in (
        ("is_unspecified", "unspecified"),
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local"),
        ("is_multicast", "multicast"),
        ("is_reserved", "reserved"),  # before "private": Python counts 240.0.0.0/4 as both
        ("is_private", "private"),
    ):
        if getattr(address, flag):
            return reason
    if not address.is_global:
        return "not publicly routable"
    return None


def literal_address(host: str) -> IPAddress | None:
    """`host` as an IP address if it is one, including the legacy IPv4 spellings
    resolvers accept (`127.1`, `0x7f000001`, `2130706433`)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _LEGACY_IPV4.match(host) and not host.endswith("."):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


async def system_resolver(host: str, port: int) -> list[str]:
    """The addresses of `host`, resolved off the event loop (the loop's executor)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class UrlGuard:
    """Refuses URLs that point at the receiver's own network (see the module docstring)."""

    def __init__(self, *, allow_private: bool = False, resolver: Resolver = system_resolver) -> None:
        self.allow_private = allow_private
        self.resolver = resolver

    def parse(self, url: str, *, field: str = "url") -> httpx.URL:
        """The URL as the sender will read it; UrlNotAllowed unless `read_url` takes it."""
        if len(url) > MAX_URL_LENGTH:
            raise self._refuse(field, f"is longer than {MAX_URL_LENGTH} characters")
        try:
            return read_url(url)
        except MalformedUrl as exc:
            raise self._refuse(field, str(exc)) from exc

    async def check(self, url: str, *, field: str = "url") -> None:
        """Refuse (UrlNotAllowed) a URL the receiver must not call.

        A name that does not resolve now is accepted: it is checked again at every connect.
        """
        parsed = self.parse(url, field=field)
        if self.allow_private:
            return
        host = parsed.raw_host.decode("ascii")
        try:
            await self.addresses(host, parsed.port or (443 if parsed.scheme == "https" else 80))
        except UrlNotAllowed as exc:
            raise self._refuse(field, str(exc), host=host) from exc
        except OSError:
            return

    async def addresses(self, host: str, port: int) -> list[str]:
        """Every address of `host`, if all of them may be called; else UrlNotAllowed.

        Resolver failures propagate as OSError (socket.gaierror).
        """
        name = host.rstrip(".").lower()
        if name in BLOCKED_NAMES or name.endswith(".localhost"):
            raise UrlNotAllowed(f"{host} is a local or metadata host name")
        literal = literal_address(name)
        if literal is not None:
            found: Sequence[str] = [str(literal)]
        else:
            found = await self.resolver(host, port)
            if not found:
                raise socket.gaierror(f"{host} has no address")
        for text in found:
            address = literal_address(text.split("%", 1)[0])
            if address is None:
                raise socket.gaierror(f"{host} resolved to {text!r}, which is not an address")
            reason = refusal(address)
            if reason is None:
                continue
            if literal is not None:
                raise UrlNotAllowed(f"{host} is a {reason} address")
            raise UrlNotAllowed(f"{host} resolves to a {reason} address ({address})")
        return list(found)

    @staticmethod
    def _refuse(field: str, problem: str, *, host: str | None = None) -> UrlNotAllowed:
        details = {"field": field, **({"host": host} if host else {})}
        message = problem if host else f"'{field}' {problem}."
        return UrlNotAllowed(message, details=details)
