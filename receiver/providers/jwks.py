"""A provider's published Ed25519 keys (a JWKS document), fetched on demand and cached.

    keys = KeySet("https://rest.alpha.fal.ai/.well-known/jwks.json", http, provider="fal", clock=clock)
    for key in await keys.current():           # cached; refreshed after `max_age`
        ...
    await keys.refetch()                       # a signature no cached key verifies:
    for key in keys.cached: ...                # try again with what is cached now

Every fetch (scheduled or forced) is at most one per `min_interval` seconds,
and only one runs at a time, so a flood of forged callbacks cannot make the
receiver hammer the key host. A failed refresh keeps the keys it had.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from receiver.errors import ProviderError, SignatureKeysUnavailable
from receiver.logs import get_logger
from receiver.providers.base import call, json_object
from receiver.types import Clock

log = get_logger("receiver.providers.jwks")

FETCH_TIMEOUT = 5.0  # seconds for one key-set request
MAX_AGE = 3600.0  # a cached key set is refreshed after an hour
MIN_INTERVAL = 30.0  # never more than one fetch per 30 s, whatever happens


class KeySet:
    """Ed25519 public keys from a JWKS URL (`{"keys": [{"kty": "OKP", "crv": "Ed25519", "x"}]}`)."""

    def __init__(
        self,
        url: str,
        client: httpx.AsyncClient,
        *,
        provider: str,
        clock: Clock,
        timeout: float = FETCH_TIMEOUT,
        max_age: float = MAX_AGE,
        min_interval: float = MIN_INTERVAL,
    ) -> None:
        self.url = url
        self.client = client
        self.provider = provider
        self.clock = clock
        self.timeout = timeout
        self.max_age = max_age
        self.min_interval = min_interval
        self._keys: tuple[Ed25519PublicKey, ...] = ()
        self._fetched_at: float | None = None  # last successful fetch
        self._attempted_at: float | None = None  # last fetch, successful or not
        self._lock = asyncio.Lock()

    @property
    def cached(self) -> tuple[Ed25519PublicKey, ...]:
        return self._keys

    async def current(self) -> tuple[Ed25519PublicKey, ...]:
        """The keys, refreshed if older than `max_age`; SignatureKeysUnavailable if there are none."""
        if self._fetched_at is None or self.clock() - self._fetched_at >= self.max_age:
            await self._fetch()
        if not self._keys:
            raise SignatureKeysUnavailable(
                self.provider,
                f"{self.provider}'s signing keys could not be fetched; the callback cannot be verified now.",
                retry_after=int(self.min_interval),
            )
        return self._keys

    async def refetch(self) -> None:
        """Fetch again because a signature matched no cached key (rotation, or a forgery).

        A no-op if a fetch was made less than `min_interval` seconds ago; read
        `cached` afterwards (another callback's fetch may have brought new keys).
        """
        await self._fetch()

    async def _fetch(self) -> None:
        async with self._lock:  # one fetch at a time; waiters see its result
            now = self.clock()
            if self._attempted_at is not None and now - self._attempted_at < self.min_interval:
                return
            self._attempted_at = now
            try:
                keys = await self._download()
            except ProviderError as exc:
                log.warning("jwks.fetch_failed", provider=self.provider, error=exc.message, kept=len(self._keys))
                return
            self._keys = keys
            self._fetched_at = now
            log.info("jwks.fetched", provider=self.provider, keys_count=len(keys))

    async def _download(self) -> tuple[Ed25519PublicKey, ...]:
        response = await call(self.client, "GET", self.url, provider=self.provider, timeout=self.timeout)
        document = json_object(response, self.provider)
        keys = tuple(key for entry in _entries(document) if (key := _ed25519(entry)) is not None)
        if not keys:
            raise ProviderError(
                f"{self.provider}'s key set holds no Ed25519 key.", provider=self.provider, code="upstream_garbled"
            )
        return keys


def _entries(document: dict[str, Any]) -> list[Any]:
    entries = document.get("keys")
    return entries if isinstance(entries, list) else []


def _ed25519(entry: Any) -> Ed25519PublicKey | None:
    """One JWK as a public key, or None if it is not a well-formed Ed25519 key."""
    if not isinstance(entry, dict) or entry.get("kty") != "OKP" or entry.get("crv") != "Ed25519":
        return None
    x = entry.get("x")
    if not isinstance(x, str):
        return None
    try:
        raw = base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError):
        return None
