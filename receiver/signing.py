"""Callback tokens: itsdangerous timed signatures that name a task.

    signer = CallbackSigner(["newest-key", "older-key"], clock=clock)
    token = signer.mint("tsk_…", max_age=604800)
    task_id = signer.verify(token)      # InvalidSignature / CallbackExpired

The first key signs and every key verifies, so keys rotate without breaking
URLs already handed out. Each purpose has its own salt, so a token minted for
one purpose never verifies for another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from itsdangerous import BadSignature, URLSafeTimedSerializer
from itsdangerous.timed import TimestampSigner

from receiver.clock import system_clock
from receiver.errors import CallbackExpired, InvalidSignature
from receiver.types import Clock

CALLBACK_SALT = "receiver.callback.v1"
ASSET_SALT = "receiver.asset.v1"


def _signer_for(clock: Clock) -> type[TimestampSigner]:
    class _ClockedSigner(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(clock())

    return _ClockedSigner


class TokenSigner:
    """Timed, URL-safe tokens carrying `[subject, max_age]` for one purpose (salt)."""

    def __init__(self, keys: Sequence[str], *, salt: str, clock: Clock = system_clock) -> None:
        if not keys or not all(keys):
            raise ValueError("at least one non-empty signing key is required")
        self.clock = clock
        # itsdangerous signs with the *last* key; the environment lists the signer first.
        self._serializer = URLSafeTimedSerializer(
            list(reversed(keys)),
            salt=salt,
            signer=_signer_for(clock),
            signer_kwargs={"digest_method": hashlib.sha256},
        )

    def mint(self, subject: str, *, max_age: int) -> str:
        return self._serializer.dumps([subject, int(max_age)])

    def verify(self, token: str) -> str:
        """The token's subject; InvalidSignature if forged, CallbackExpired if too old."""
        try:
            payload, signed_at = self._serializer.loads(token, return_timestamp=True)
        except BadSignature as exc:
            raise InvalidSignature("The callback URL's signature is not valid.") from exc
        if (
            not isinstance(payload, list)
            or len(payload) != 2
            or not isinstance(payload[0], str)
            or not isinstance(payload[1], int)
        ):
            raise InvalidSignature("The callback URL's token is malformed.")
        subject: str = payload[0]
        max_age: int = payload[1]
        if self.clock() - signed_at.timestamp() > max_age:
            raise CallbackExpired("This callback URL has expired.", details={"task_id": subject})
        return subject


class CallbackSigner(TokenSigner):
    """Tokens for `/callbacks/{token}`."""

    def __init__(self, keys: Sequence[str], *, clock: Clock = system_clock) -> None:
        super().__init__(keys, salt=CALLBACK_SALT, clock=clock)


class AssetSigner(TokenSigner):
    """Tokens for `/assets/{token}` (the asset store's file names)."""

    def __init__(self, keys: Sequence[str], *, clock: Clock = system_clock) -> None:
        super().__init__(keys, salt=ASSET_SALT, clock=clock)
