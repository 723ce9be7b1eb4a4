"""Provider signatures: the second check on callbacks from providers that sign them.

The URL token proves the callback URL is ours; a provider signature proves the
body came from the provider (Replicate: Standard Webhooks under the account's
`whsec_` secret; fal: ED25519 under its published key set). Both must hold,
so a leaked callback URL is not enough to forge a result.

    signatures = ProviderSignatures({"replicate": ReplicateSignature(secret, clock=clock)})
    check = await signatures.check("replicate", body, headers, task_id="tsk_…")
    # SignatureCheck.VERIFIED; UNCHECKED when no secret is configured;
    # None for a dialect whose provider does not sign; InvalidProviderSignature otherwise

A verifier that is not configured lets the callback through, and the caller
records that the signature was not checked (a warning on the task, a flag on
the stored callback).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Protocol

from receiver.errors import InvalidProviderSignature
from receiver.logs import get_logger

log = get_logger("receiver.callbacks")

#: How far a signed timestamp may be from our clock, either way (both providers use 5 minutes).
TOLERANCE = 300.0


class SignatureCheck(enum.StrEnum):
    """What the provider-signature check made of a callback that was let in."""

    VERIFIED = "verified"
    UNCHECKED = "unchecked"  # the provider signs, but no secret / key set is configured


class ProviderSignature(Protocol):
    """Checks one provider's own signature on a callback body."""

    name: str

    @property
    def configured(self) -> bool:
        """False when the operator gave no secret (or disabled the key set): nothing is checked."""

    @property
    def unchecked_warning(self) -> str:
        """The warning recorded on a task whose callback was let in unchecked."""

    async def verify(self, body: bytes, headers: Mapping[str, str]) -> None:
        """Return if the signature holds; raise InvalidProviderSignature if not.

        `headers` has lower-case names. May raise SignatureKeysUnavailable when
        the keys needed to decide cannot be had.
        """


def signed_timestamp(provider: str, raw: str, *, now: float, tolerance: float = TOLERANCE) -> int:
    """A signed `timestamp` header (unix seconds) checked against our clock, not the library's."""
    value = raw.strip()
    if not value.isascii() or not value.isdigit() or len(value) > 12:
        raise InvalidProviderSignature(provider, "malformed_timestamp", "The signature timestamp is not unix seconds.")
    stamp = int(value)
    if stamp < now - tolerance:
        raise InvalidProviderSignature(
            provider, "stale_timestamp", f"The signature is more than {tolerance:g} s old (a replay?)."
        )
    if stamp > now + tolerance:
        raise InvalidProviderSignature(
            provider, "future_timestamp", f"The signature is dated more than {tolerance:g} s ahead of our clock."
        )
    return stamp


class ProviderSignatures:
    """The signature verifiers by dialect name, built once per app (see `providers.signatures_for`)."""

    def __init__(self, verifiers: Mapping[str, ProviderSignature]) -> None:
        self._verifiers = dict(verifiers)
        for verifier in self._verifiers.values():
            if not verifier.configured:
                log.warning("provider_signature.not_configured", provider=verifier.name)

    def __contains__(self, dialect: object) -> bool:
        return dialect in self._verifiers

    def warning(self, dialect: str) -> str:
        return self._verifiers[dialect].unchecked_warning

    async def check(
        self, dialect: str, body: bytes, headers: Mapping[str, str], *, task_id: str
    ) -> SignatureCheck | None:
        """Verify `body` for a `dialect` callback; None if that dialect's provider does not sign."""
        verifier = self._verifiers.get(dialect)
        if verifier is None:
            return None
        if not verifier.configured:
            log.warning("callback.provider_signature_unchecked", task_id=task_id, provider=dialect)
            return SignatureCheck.UNCHECKED
        lowered = {name.lower(): value for name, value in headers.items()}
        try:
            await verifier.verify(body, lowered)
        except InvalidProviderSignature as exc:
            log.warning("callback.provider_signature_refused", task_id=task_id, provider=dialect, reason=exc.reason)
            raise
        except ValueError as exc:
            # Belt and braces: a parse error a verifier did not foresee (bad base64, bad
            # UTF-8, …) is still a bad signature, never a 500.
            log.warning("callback.provider_signature_refused", task_id=task_id, provider=dialect, reason="malformed")
            raise InvalidProviderSignature(dialect, "malformed", "The provider signature is malformed.") from exc
        return SignatureCheck.VERIFIED
