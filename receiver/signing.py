"""Callback tokens: itsdangerous timed signatures that name a task.

    signer = CallbackSigner(["newest-key", "older-key"], clock=clock)
    token = signer.mint("tsk_…", max_age=604800, scope="xhuoapi")
    task_id = signer.verify(token)      # InvalidSignature / CallbackExpired
    claims = signer.open(token)         # Claims(subject="tsk_…", scope="xhuoapi")

The first key signs and every key verifies, so keys rotate without breaking
URLs already handed out. Each purpose has its own salt, so a token minted for
one purpose never verifies for another.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

import orjson
from itsdangerous import BadData, BadSignature, URLSafeTimedSerializer
from itsdangerous.timed import TimestampSigner

from receiver.clock import system_clock
from receiver.errors import CallbackExpired, InvalidSignature
from receiver.types import Clock

CALLBACK_SALT = "receiver.callback.v1"
_URLSAFE = bytes.maketrans(b"-_", b"+/")
ASSET_SALT = "receiver.asset.v1"


def _signer_for(clock: Clock) -> type[TimestampSigner]:
    class _ClockedSigner(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(clock())

    return _ClockedSigner


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token says: its subject and, if it was minted with one, its scope."""

    subject: str
    scope: str | None = None


class TokenSigner:
    """Timed, URL-safe tokens carrying `[subject, max_age]` (or `[subject, max_age, scope]`)
    for one purpose (salt)."""

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
        # Verification runs once per callback, so it skips itsdangerous's per-call signer objects
        # and key derivation: the same check (HMAC-SHA256 over "payload.timestamp" under each
        # derived key, newest first, compared in constant time) with the keys derived once.
        # tests/test_signing.py holds it to itsdangerous's own verdict.
        signer = self._serializer.make_signer()
        self._derived = [signer.derive_key(key) for key in reversed(signer.secret_keys)]

    def mint(self, subject: str, *, max_age: int, scope: str | None = None) -> str:
        payload: list[str | int] = [subject, int(max_age)]
        if scope is not None:
            payload.append(scope)
        return self._serializer.dumps(payload)

    def verify(self, token: str) -> str:
        """The token's subject; InvalidSignature if forged, CallbackExpired if too old."""
        return self.open(token).subject

    def open(self, token: str) -> Claims:
        """The token's claims; InvalidSignature if forged, CallbackExpired if too old."""
        signed, _, signature = token.rpartition(".")
        encoded, _, stamp = signed.rpartition(".")
        try:
            if not encoded or not stamp or not signed.isascii():
                raise BadSignature("not a token")
            expected = _b64(signature)
            # 32 bytes take 43 characters whose last carries 2 unused bits: 4 spellings would decode
            # alike. Only the one itsdangerous writes is taken (the rest is under the signature).
            if base64.urlsafe_b64encode(expected).rstrip(b"=") != signature.encode("ascii"):
                raise BadSignature("not the signature's one spelling")
            message = signed.encode("ascii")
            if not any(hmac.compare_digest(hmac.digest(key, message, "sha256"), expected) for key in self._derived):
                raise BadSignature("signature does not match")
            signed_at = int.from_bytes(_b64(stamp), "big")
            if encoded.startswith("."):  # compressed: never minted for payloads this small, but valid
                payload = self._serializer.load_payload(encoded.encode("ascii"))
            else:
                payload = orjson.loads(_b64(encoded))
        except (BadData, binascii.Error, ValueError) as exc:  # a bad signature, or not what we mint
            raise InvalidSignature("The callback URL's signature is not valid.") from exc
        if (
            not isinstance(payload, list)
            or len(payload) not in (2, 3)
            or not isinstance(payload[0], str)
            or not isinstance(payload[1], int)
            or (len(payload) == 3 and not isinstance(payload[2], str))
        ):
            raise InvalidSignature("The callback URL's token is malformed.")
        subject: str = payload[0]
        max_age: int = payload[1]
        if self.clock() - signed_at > max_age:
            raise CallbackExpired("This callback URL has expired.", details={"task_id": subject})
        return Claims(subject, payload[2] if len(payload) == 3 else None)


def _b64(text: str) -> bytes:
    """itsdangerous's URL-safe, unpadded base64. Strictly: a character outside the alphabet is an
    error, not skipped, so one token has one spelling (what a blocklist or log search relies on)."""
    return binascii.a2b_base64(text.encode().translate(_URLSAFE) + b"=" * (-len(text) % 4), strict_mode=True)


class CallbackSigner(TokenSigner):
    """Tokens for `/callbacks/{token}`."""

    def __init__(self, keys: Sequence[str], *, clock: Clock = system_clock) -> None:
        super().__init__(keys, salt=CALLBACK_SALT, clock=clock)


class AssetSigner(TokenSigner):
    """Tokens for `/assets/{token}` (the asset store's file names)."""

    def __init__(self, keys: Sequence[str], *, clock: Clock = system_clock) -> None:
        super().__init__(keys, salt=ASSET_SALT, clock=clock)
