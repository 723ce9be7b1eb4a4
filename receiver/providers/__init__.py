"""Providers (who we submit to) and callback dialects (what we can read).

registry = Providers(settings, client)
provider = registry.get("xhuoapi")
report = dialect_for("auto", payload).parse(payload)
signatures = signatures_for(settings, client, clock)   # Replicate's and fal's own signatures
"""

from __future__ import annotations

from collections.abc import Callable

import httpx

from receiver.config import Settings
from receiver.errors import InvalidPayload
from receiver.providers.base import Dialect, Poller, Provider, SyncProvider
from receiver.providers.dialects import ApimartDialect, KieDialect, KlingDialect
from receiver.providers.fal import FalDialect, FalProvider, FalSignature
from receiver.providers.jwks import KeySet
from receiver.providers.replicate import ReplicateDialect, ReplicateProvider, ReplicateSignature
from receiver.providers.router import RouterProvider
from receiver.providers.signatures import ProviderSignatures
from receiver.providers.xenodia import XenodiaProvider
from receiver.providers.xhuoapi import XhuoapiDialect, XhuoapiProvider
from receiver.types import JSON, Clock

#: Callback dialects by name; `auto` asks every one and needs exactly one to recognise the payload.
DIALECTS: dict[str, Dialect] = {
    "xhuoapi": XhuoapiDialect(),
    "replicate": ReplicateDialect(),
    "fal": FalDialect(),
    "kie": KieDialect(),
    "kling": KlingDialect(),
    "apimart": ApimartDialect(),
}

ProviderFactory = Callable[[Settings, httpx.AsyncClient], Provider | SyncProvider]

PROVIDERS: dict[str, ProviderFactory] = {
    "xhuoapi": lambda s, c: XhuoapiProvider(s.provider("xhuoapi"), c, timeout=s.provider_timeout),
    "replicate": lambda s, c: ReplicateProvider(s.provider("replicate"), c, timeout=s.provider_timeout),
    "fal": lambda s, c: FalProvider(s.provider("fal"), c, timeout=s.provider_timeout),
    "xenodia": lambda s, c: XenodiaProvider(s.provider("xenodia"), c, timeout=s.provider_timeout),
    "router": lambda s, c: RouterProvider(s.provider("router"), c),
}

#: Dialects a task minted by POST /v1/callback-urls may name.
CALLBACK_DIALECTS = (*DIALECTS, "auto")
#: Every provider a task may have (what `GET /v1/tasks?provider=` filters on).
TASK_PROVIDERS = tuple(sorted({*PROVIDERS, *CALLBACK_DIALECTS}))


class Providers:
    """The configured providers, built once per app around the shared HTTP client."""

    def __init__(self, settings: Settings, client: httpx.AsyncClient) -> None:
        self._built = {name: factory(settings, client) for name, factory in PROVIDERS.items()}

    def get(self, name: str) -> Provider:
        """The provider tasks of `name` are submitted to (not a SyncProvider: see `sync`)."""
        provider = self._built[name]
        if isinstance(provider, SyncProvider):
            raise TypeError(f"{name} is called by a background job, not submitted")
        return provider

    def sync(self, name: str) -> SyncProvider | None:
        """The provider if it answers synchronously (called from a background job), else None."""
        provider = self._built.get(name)
        return provider if isinstance(provider, SyncProvider) else None

    def poller(self, name: str) -> Poller | None:
        """The provider if its results are pulled by polling, else None."""
        provider = self._built.get(name)
        return provider if isinstance(provider, Poller) else None

    def names(self) -> list[str]:
        return list(self._built)

    def __contains__(self, name: object) -> bool:
        return name in self._built


def detect(payload: JSON) -> Dialect:
    """The dialect `payload` is written in; InvalidPayload if none, or more than one, recognises it."""
    found = [dialect for dialect in DIALECTS.values() if dialect.detect(payload)]
    if not found:
        raise InvalidPayload("No known callback dialect recognises this payload.")
    if len(found) > 1:
        names = ", ".join(d.name for d in found)
        raise InvalidPayload(
            f"This payload could be {names}: mint the callback URL for its provider instead of auto.",
            details={"dialects": [d.name for d in found]},
        )
    return found[0]


def dialect_for(name: str, payload: JSON) -> Dialect:
    """The dialect of a task whose provider (or callback dialect) is `name`."""
    if name == "auto":
        return detect(payload)
    dialect = DIALECTS.get(name)
    if dialect is None:
        raise InvalidPayload(f"The receiver cannot read '{name}' callbacks.")
    return dialect


def signatures_for(settings: Settings, client: httpx.AsyncClient, clock: Clock) -> ProviderSignatures:
    """The provider-signature verifiers (Replicate's secret, fal's key set), built once per app."""
    keys = None
    if settings.fal_jwks_url is not None:
        keys = KeySet(settings.fal_jwks_url, client, provider="fal", clock=clock)
    return ProviderSignatures(
        {
            "replicate": ReplicateSignature(settings.replicate_webhook_secret, clock=clock),
            "fal": FalSignature(keys, clock=clock, user_ids=settings.fal_user_ids),
        }
    )
