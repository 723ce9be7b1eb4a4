"""Bearer API keys for the management API.

Keys are compared as SHA-256 digests with `hmac.compare_digest`, against every
configured key (no early exit), so timing tells nothing about a key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from receiver.errors import Unauthorized, json_response

KEY_ID_SCOPE = "receiver.key_id"


class ApiKeys:
    """The configured keys, kept as digests."""

    def __init__(self, keys: Sequence[str]) -> None:
        if not keys:
            raise ValueError("at least one API key is required")
        self._digests = [hashlib.sha256(key.encode()).digest() for key in keys]

    def identify(self, presented: str | None) -> str | None:
        """A short, stable id of the matching key (for scoping), or None."""
        if not presented:
            return None
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for candidate in self._digests:
            if hmac.compare_digest(candidate, digest):
                found = candidate
        return found.hex()[:16] if found is not None else None

    def check_header(self, authorization: str | None) -> str | None:
        if not authorization:
            return None
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return None
        return self.identify(value.strip())


class BearerAuth:
    """ASGI middleware: 401 unless `Authorization: Bearer <a configured key>`."""

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        key_id = self.keys.check_header(authorization)
        if key_id is None:
            error = Unauthorized()
            await json_response(error.body(), error.status_code, error.headers)(scope, receive, send)
            return
        scope[KEY_ID_SCOPE] = key_id
        await self.app(scope, receive, send)
