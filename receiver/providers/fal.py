"""fal: the queue API with a `fal_webhook`, callbacks signed with ED25519.

Submit: `POST {base}/{model_id}?fal_webhook=<callback URL>` with the model's input
`{prompt, …}` and `Authorization: Key …` -> `{"request_id", "gateway_request_id", …}`.
Callback: `{"request_id", "gateway_request_id", "status": "OK"|"ERROR", "payload": {"images":
[{"url", …}]}, "error"?, "payload_error"?}` with headers `X-Fal-Webhook-Request-Id`, `-User-Id`,
`-Timestamp` and `-Signature`: hex ED25519 over `request_id\\nuser_id\\ntimestamp\\nsha256_hex(body)`
under one of the keys fal publishes as a JWKS document.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from receiver.clock import system_clock
from receiver.errors import InvalidPayload, InvalidProviderSignature
from receiver.providers.base import (
    HttpProvider,
    Submission,
    Upload,
    bearer_headers,
    image_list,
    json_object,
    optional_str,
)
from receiver.providers.jwks import KeySet
from receiver.providers.signatures import signed_timestamp
from receiver.tasks import Report, Task
from receiver.types import JSON, Clock, TaskState

_IMAGE_KEYS = ("url", "content_type", "file_name")
HEADERS = ("x-fal-webhook-request-id", "x-fal-webhook-user-id", "x-fal-webhook-timestamp", "x-fal-webhook-signature")


class FalDialect:
    name = "fal"

    def detect(self, payload: JSON) -> bool:
        return (
            isinstance(payload.get("request_id"), str)
            and "gateway_request_id" in payload
            and payload.get("status") in ("OK", "ERROR")
        )

    def parse(self, payload: JSON) -> Report:
        upstream = optional_str(payload, "request_id")
        status = payload.get("status")
        result = payload.get("payload")
        if status == "ERROR":
            message = payload.get("error")
            error: JSON = {
                "code": "upstream_failed",
                "message": message if isinstance(message, str) and message else "fal reported an error.",
            }
            if result is not None:
                error["details"] = result  # e.g. the model's validation errors
            return Report(TaskState.FAILED, upstream, error=error, dialect=self.name)
        if status != "OK":
            raise InvalidPayload("A fal callback has a status of OK or ERROR.")
        if result is None:  # fal could not serialise the result
            reason = payload.get("payload_error")
            error = {
                "code": "upstream_payload_error",
                "message": reason if isinstance(reason, str) and reason else "fal delivered no payload.",
            }
            return Report(TaskState.FAILED, upstream, error=error, dialect=self.name)
        if not isinstance(result, dict):
            raise InvalidPayload("A fal callback's payload is an object.")
        images = _images(result)
        if not images:
            error = {"code": "empty_result", "message": "fal reported success without any image."}
            return Report(TaskState.FAILED, upstream, error=error, dialect=self.name)
        return Report(TaskState.SUCCEEDED, upstream, images=images, dialect=self.name)


def _images(result: JSON) -> tuple[JSON, ...]:
    """`images: [{"url", …}]`, or the single `image: {"url", …}` some models answer."""
    if "images" in result:
        return image_list(result["images"], keys=_IMAGE_KEYS)
    if isinstance(result.get("image"), dict):
        return image_list([result["image"]], keys=_IMAGE_KEYS)
    return ()


class FalProvider(HttpProvider):
    name = "fal"
    dialect = "fal"

    def headers(self) -> dict[str, str]:
        return bearer_headers(self.settings, scheme="Key")  # fal's scheme, not Bearer

    async def submit(self, task: Task, callback_url: str, uploads: Sequence[Upload] = ()) -> Submission:
        response = await self.call(
            "POST",
            f"{self.settings.url}/{task.model}",
            params={"fal_webhook": callback_url},
            json=dict(task.request),  # {"prompt", …params}, validated by the catalog
        )
        answer = json_object(response, self.name)
        request_id = answer.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            raise self.garbled("fal accepted the request but named no request_id.", response, answer)
        return Submission(request_id, raw=answer)


class FalSignature:
    """ED25519 verification against fal's published key set.

    No key id travels with a callback, so every cached key is tried; when none
    verifies, the key set is fetched again once (fal may have rotated) — the
    KeySet rate-limits that, so forged callbacks cannot make us hammer fal.
    `user_ids`, when given, are the only fal accounts whose callbacks are
    accepted (fal's keys sign every account's webhooks).
    """

    name = "fal"

    def __init__(self, keys: KeySet | None, *, clock: Clock = system_clock, user_ids: Collection[str] = ()) -> None:
        self.keys = keys
        self.clock = clock
        self.user_ids = frozenset(user_ids)

    @property
    def configured(self) -> bool:
        return self.keys is not None

    @property
    def unchecked_warning(self) -> str:
        return (
            "provider_signature_not_checked: RECEIVER_FAL_JWKS_URL is off, so fal's webhook signature was not verified"
        )

    async def verify(self, body: bytes, headers: Mapping[str, str]) -> None:
        assert self.keys is not None, "verify() needs a key set"
        request_id, user_id, stamp, signature = (headers.get(name, "").strip() for name in HEADERS)
        if not (request_id and user_id and stamp and signature):
            raise self._refused(
                "missing_headers",
                "The X-Fal-Webhook-Request-Id, -User-Id, -Timestamp and -Signature headers are required.",
            )
        signed_timestamp(self.name, stamp, now=self.clock())
        try:
            signature_bytes = bytes.fromhex(signature)
        except ValueError as exc:
            raise self._refused("malformed_signature", "X-Fal-Webhook-Signature is not hex.") from exc
        if len(signature_bytes) != 64:
            raise self._refused("malformed_signature", "X-Fal-Webhook-Signature is not an ED25519 signature.")
        if self.user_ids and user_id not in self.user_ids:
            raise self._refused("unknown_user", "The callback is for a fal account not in RECEIVER_FAL_USER_IDS.")
        message = "\n".join((request_id, user_id, stamp, hashlib.sha256(body).hexdigest())).encode()
        tried = await self.keys.current()
        if _any_verifies(tried, signature_bytes, message):
            return
        # Unknown key: fal may have rotated. Fetch once (rate-limited), then try whatever is
        # cached now — a concurrent callback's fetch may have brought the new key already.
        await self.keys.refetch()
        fresh = self.keys.cached
        if fresh is not tried and _any_verifies(fresh, signature_bytes, message):
            return
        raise self._refused("mismatch", "No key in fal's key set verifies this signature.")

    def _refused(self, reason: str, message: str) -> InvalidProviderSignature:
        return InvalidProviderSignature(self.name, reason, message)


def _any_verifies(keys: Sequence[Ed25519PublicKey], signature: bytes, message: bytes) -> bool:
    for key in keys:
        try:
            key.verify(signature, message)
        except InvalidSignature:
            continue
        return True
    return False
