"""Standard Webhooks headers for one delivery attempt.

    headers = webhook_headers("evt_…", body, ["whsec_…"], now=clock())

The `standardwebhooks` library computes each signature (`v1,<base64 HMAC-SHA256
of "{id}.{timestamp}.{body}">`). During a secret rotation's overlap the header
carries one signature per secret, space-separated, as the specification allows,
so a subscriber verifies with either the new or the old secret.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from functools import lru_cache

from standardwebhooks.webhooks import Webhook


@lru_cache(maxsize=1024)
def _webhook(secret: str) -> Webhook:
    return Webhook(secret)  # decodes the base64 once per secret


def sign(event_id: str, timestamp: int, body: bytes, secret: str) -> str:
    """One `v1,<signature>` for `secret`."""
    moment = datetime.fromtimestamp(timestamp, tz=UTC)
    signature: str = _webhook(secret).sign(msg_id=event_id, timestamp=moment, data=body.decode("utf-8"))
    return signature


def webhook_headers(event_id: str, body: bytes, secrets: Sequence[str], *, now: float) -> dict[str, str]:
    """The headers of one attempt: `webhook-id` is the event (the same on every retry),
    `webhook-timestamp` is this attempt's time, `webhook-signature` one entry per secret."""
    if not secrets:
        raise ValueError("at least one signing secret is required")
    timestamp = int(now)
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(sign(event_id, timestamp, body, secret) for secret in secrets),
        "content-type": "application/json",
    }
