"""The collaborators every route and worker shares, built once by the app's lifespan."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field

import httpx

from receiver.assets import AssetStore
from receiver.config import Settings
from receiver.delivery.urlguard import UrlGuard
from receiver.metrics import Metrics
from receiver.providers import Providers
from receiver.providers.signatures import ProviderSignatures
from receiver.signing import CallbackSigner
from receiver.store.base import Store
from receiver.types import Clock


@dataclass
class Context:
    settings: Settings
    store: Store
    clock: Clock
    http: httpx.AsyncClient
    providers: Providers
    signer: CallbackSigner
    metrics: Metrics
    signatures: ProviderSignatures  # providers' own callback signatures (Replicate, fal)
    assets: AssetStore
    url_guard: UrlGuard
    instance_id: str = field(default_factory=lambda: instance_id())  # named in self-test answers

    def callback_url(self, task_id: str, *, dialect: str, max_age: int | None = None) -> str:
        """The signed URL a provider posts `task_id`'s result to.

        The token names the callback dialect too (a provider, or `auto`), so a callback can be
        verified and parsed before the database is touched."""
        token = self.signer.mint(task_id, max_age=max_age or self.settings.callback_max_age, scope=dialect)
        return f"{self.settings.public_url}/callbacks/{token}"


#: Set by `receiver serve --workers N` for its worker processes, so they answer self-tests as one receiver.
INSTANCE_VARIABLE = "RECEIVER_INSTANCE_ID"


def instance_id() -> str:
    """This receiver's id (receiver.selftest): the serving command's, or a new one."""
    return os.environ.get(INSTANCE_VARIABLE) or secrets.token_hex(8)
