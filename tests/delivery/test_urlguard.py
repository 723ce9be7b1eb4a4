"""The URL guard, with literal addresses and a fake resolver: no real DNS lookups."""

from __future__ import annotations

import re
import socket
from collections.abc import Sequence

import pytest

from receiver.delivery.urlguard import UrlGuard, literal_address
from receiver.errors import UrlNotAllowed

pytestmark = pytest.mark.anyio


class FakeDNS:
    def __init__(self, records: dict[str, Sequence[str]]) -> None:
        self.records = dict(records)
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.lookups.append(host)
        if host not in self.records:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.records[host]


REFUSED_ADDRESSES = [
    pytest.param("127.0.0.1", "loopback", id="ipv4-loopback"),
    pytest.param("127.8.9.10", "loopback", id="ipv4-loopback-range"),
    pytest.param("[::1]", "loopback", id="ipv6-loopback"),
    pytest.param("10.0.0.5", "private", id="ipv4-private-10"),
    pytest.param("172.16.3.4", "private", id="ipv4-private-172"),
    pytest.param("192.168.1.1", "private", id="ipv4-private-192"),
    pytest.param("[fd12:3456::1]", "private", id="ipv6-unique-local"),
    pytest.param("169.254.1.1", "link-local", id="ipv4-link-local"),
    pytest.param("[fe80::1]", "link-local", id="ipv6-link-local"),
    pytest.param("100.64.0.1", "CGNAT", id="ipv4-cgnat"),
    pytest.param("100.127.255.254", "CGNAT", id="ipv4-cgnat-end"),
    pytest.param("224.0.0.1", "multicast", id="ipv4-multicast"),
    pytest.param("[ff02::1]", "multicast", id="ipv6-multicast"),
    pytest.param("0.0.0.0", "unspecified", id="ipv4-unspecified"),
    pytest.param("[::]", "unspecified", id="ipv6-unspecified"),
    pytest.param("240.0.0.1", "reserved", id="ipv4-reserved-class-e"),
    pytest.param("255.255.255.255", "reserved", id="ipv4-broadcast"),
    pytest.param("192.0.0.8", "IETF protocol assignment", id="ipv4-ietf-protocol-assignments"),
    pytest.param("192.0.0.192", "cloud metadata", id="metadata-oracle-legacy"),
    pytest.param("192.0.2.10", "documentation", id="ipv4-documentation"),
    pytest.param("[2001:db8::1]", "documentation", id="ipv6-documentation"),
    pytest.param("198.18.0.1", "benchmarking", id="ipv4-benchmarking"),
    pytest.param("169.254.169.254", "cloud metadata", id="metadata-ipv4"),
    pytest.param("[fd00:ec2::254]", "cloud metadata", id="metadata-aws-ipv6"),
    pytest.param("100.100.100.200", "cloud metadata", id="metadata-alibaba"),
    pytest.param("168.63.129.16", "cloud metadata", id="metadata-azure"),
    pytest.param("[::ffff:127.0.0.1]", "loopback (inside", id="ipv4-mapped-loopback"),
    pytest.param("[::ffff:169.254.169.254]", "cloud metadata (inside", id="ipv4-mapped-metadata"),
    pytest.param("[64:ff9b::a00:1]", "private (inside", id="nat64-private"),
    pytest.param("[64:ff9b::7f00:1]", "loopback (inside", id="nat64-loopback"),
    pytest.param("[64:ff9b:1::1]", "local-use NAT64", id="nat64-local-use"),
    pytest.param("[2002:c0a8:101::1]", "private (inside", id="6to4-private"),
    pytest.param("[2001::1]", "private", id="teredo"),
    pytest.param("[fec0::1]", "site-local", id="ipv6-site-local"),
    pytest.param("127.1", "loopback", id="ipv4-short-form"),
    pytest.param("2130706433", "loopback", id="ipv4-as-integer"),
    pytest.param("0x7f000001", "loopback", id="ipv4-as-hex"),
    pytest.param("017700000001", "loopback", id="ipv4-as-octal"),
]


@pytest.mark.parametrize(("host", "reason"), REFUSED_ADDRESSES)
async def test_literal_addresses_of_every_refused_kind(host: str, reason: str) -> None:
    dns = FakeDNS({})
    guard = UrlGuard(resolver=dns)
    with pytest.raises(UrlNotAllowed, match=re.escape(reason)) as refused:
        await guard.check(f"https://{host}:8443/hook")
    assert refused.value.code == "url_not_allowed" and refused.value.details["field"] == "url"
    assert dns.lookups == []  # literals are never looked up


@pytest.mark.parametrize(("host", "reason"), REFUSED_ADDRESSES)
async def test_names_resolving_to_every_refused_kind(host: str, reason: str) -> None:
    address = str(literal_address(host.strip("[]")))  # what a resolver answers
    dns = FakeDNS({"hooks.example.com": ["93.184.216.34", address]})  # one bad address is enough
    with pytest.raises(UrlNotAllowed, match=re.escape(reason)):
        await UrlGuard(resolver=dns).check("https://hooks.example.com/hook")


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("http://localhost:8000/x", id="localhost"),
        pytest.param("http://LOCALHOST./x", id="localhost-upper-dot"),
        pytest.param("http://api.localhost/x", id="dot-localhost"),
        pytest.param("http://metadata.google.internal/computeMetadata/v1/", id="gcp-metadata"),
        pytest.param("http://metadata/computeMetadata/v1/", id="gcp-metadata-short"),
        pytest.param("http://instance-data/latest/", id="aws-instance-data"),
    ],
)
async def test_local_and_metadata_names(url: str) -> None:
    dns = FakeDNS({})
    with pytest.raises(UrlNotAllowed):
        await UrlGuard(resolver=dns).check(url)
    assert dns.lookups == []


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("ftp://example.com/x", id="ftp"),
        pytest.param("file:///etc/passwd", id="file"),
        pytest.param("gopher://example.com/", id="gopher"),
        pytest.param("javascript:alert(1)", id="javascript"),
        pytest.param("not a url", id="words"),
        pytest.param("http:///path-only", id="no-host"),
        pytest.param("https://example.com:99999/", id="bad-port"),
        pytest.param("https://example.com/" + "a" * 2100, id="too-long"),
        pytest.param("http://a..b/", id="empty-label"),
        pytest.param("http://exa mple.com/", id="space-in-host"),
        pytest.param("http://example.com/a b", id="space-in-path"),
        pytest.param("http://example.com/\x00", id="control-character"),
        pytest.param("http://-bad-.com/", id="label-with-edge-hyphen"),
        pytest.param(f"http://{'a' * 64}.com/", id="label-over-63"),
        pytest.param("http://[::1/", id="unclosed-bracket"),
    ],
)
async def test_only_http_and_https_urls_with_a_host(url: str) -> None:
    with pytest.raises(UrlNotAllowed):
        await UrlGuard(resolver=FakeDNS({"example.com": ["93.184.216.34"]})).check(url)


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("https://hooks.example.com/stripe?x=1", id="public-name"),
        pytest.param("http://93.184.216.34:8080/hook", id="public-ipv4"),
        pytest.param("https://[2606:4700:4700::1111]/hook", id="public-ipv6"),
        pytest.param("https://[64:ff9b::5db8:d822]/hook", id="nat64-of-public"),
        pytest.param("https://[::ffff:93.184.216.34]/hook", id="mapped-public"),
        pytest.param("https://unresolvable.example.org/hook", id="not-resolvable-yet"),
        pytest.param("https://hooks.example.com./hook", id="fully-qualified"),
        pytest.param("https://my_hooks.example.org/hook", id="underscore"),
        pytest.param("https://bücher.example.org/hook", id="internationalised"),
    ],
)
async def test_public_urls_pass(url: str) -> None:
    dns = FakeDNS({"hooks.example.com": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"]})
    await UrlGuard(resolver=dns).check(url)


async def test_connect_time_lookups_return_every_checked_address() -> None:
    dns = FakeDNS({"hooks.example.com": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"]})
    guard = UrlGuard(resolver=dns)
    assert await guard.addresses("hooks.example.com", 443) == ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"]
    assert await guard.addresses("93.184.216.34", 443) == ["93.184.216.34"]
    with pytest.raises(socket.gaierror):
        await guard.addresses("gone.example.com", 443)  # a connect error, not a refusal
    dns.records["hooks.example.com"] = ["10.0.0.1"]  # the name was rebound
    with pytest.raises(UrlNotAllowed, match="private"):
        await guard.addresses("hooks.example.com", 443)


async def test_allowing_private_urls_turns_the_checks_off() -> None:
    dns = FakeDNS({})
    guard = UrlGuard(allow_private=True, resolver=dns)
    await guard.check("http://127.0.0.1:8000/hook")
    await guard.check("http://localhost:8000/hook")
    with pytest.raises(UrlNotAllowed):
        await guard.check("ftp://127.0.0.1/")  # the scheme rule stays
    assert dns.lookups == []


async def test_the_field_is_named_in_the_error() -> None:
    with pytest.raises(UrlNotAllowed) as refused:
        await UrlGuard().check("http://10.1.1.1/", field="notify_url")
    assert refused.value.details == {"field": "notify_url", "host": "10.1.1.1"}
