"""Replicate: predictions with a `webhook`, signed with Standard Webhooks headers.

Submit: `POST {base}/v1/models/{owner}/{name}/predictions` (or `POST {base}/v1/predictions`
with `version` for a version id) `{input: {prompt, …}, webhook, webhook_events_filter}` ->
`201 {"id", "status": "starting", …}`. Callbacks carry the prediction object
`{"id", "status": starting|processing|succeeded|failed|canceled|aborted, "output", "error", "metrics", …}`
with `webhook-id`, `webhook-timestamp`, `webhook-signature` headers signed under the
account's `whsec_` secret (`GET /v1/webhooks/default/secret`).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from standardwebhooks import Webhook
from starlette.datastructures import Secret

from receiver.clock import system_clock
from receiver.config import whsec_secrets
from receiver.errors import InvalidPayload, InvalidProviderSignature
from receiver.providers.base import (
    HttpProvider,
    Submission,
    Upload,
    error_object,
    image_list,
    json_object,
    optional_str,
)
from receiver.providers.signatures import signed_timestamp
from receiver.tasks import Report, Task
from receiver.types import JSON, Clock, TaskState

#: Which prediction events Replicate posts unless the request says otherwise.
DEFAULT_EVENTS = ("start", "completed")
#: A request parameter of ours (sent beside `input`, not in it).
EVENTS_PARAM = "webhook_events_filter"

_STATES = {
    "starting": TaskState.RUNNING,
    "processing": TaskState.RUNNING,
    "succeeded": TaskState.SUCCEEDED,
    "failed": TaskState.FAILED,
    "canceled": TaskState.CANCELLED,
    "aborted": TaskState.FAILED,  # ended before it started (a deadline passed): not the client's doing
}
_TERMINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})


class ReplicateDialect:
    name = "replicate"

    def detect(self, payload: JSON) -> bool:
        # A prediction object: an id, one of Replicate's statuses, and keys only predictions
        # carry (apimart's `{"id", "status": "failed", "result"}` must not look like one).
        status = payload.get("status")
        return (
            isinstance(payload.get("id"), str)
            and isinstance(status, str)  # a list or object status is not one (and is unhashable)
            and status in _STATES
            and any(key in payload for key in ("urls", "version", "output"))
            and "result" not in payload
        )

    def parse(self, payload: JSON) -> Report:
        upstream = optional_str(payload, "id")
        status = payload.get("status")
        if not isinstance(status, str) or status not in _STATES:
            raise InvalidPayload(f"A Replicate prediction has a status, one of: {', '.join(_STATES)}.")
        state = _STATES[status]
        if state is TaskState.RUNNING:
            return Report(state, upstream, dialect=self.name)
        if state is TaskState.CANCELLED:
            error = {"code": "upstream_cancelled", "message": "The prediction was canceled on Replicate."}
            return Report(state, upstream, error=error, dialect=self.name)
        if state is TaskState.FAILED:
            error = error_object(payload.get("error"), "upstream_aborted" if status == "aborted" else "upstream_failed")
            return Report(state, upstream, error=error, dialect=self.name)
        images = _images(payload.get("output"))
        if not images:
            error = {"code": "empty_result", "message": "Replicate reported success without any output."}
            return Report(TaskState.FAILED, upstream, error=error, dialect=self.name)
        return Report(state, upstream, images=images, dialect=self.name)


def _images(output: Any) -> tuple[JSON, ...]:
    """`output` is a URL, a list of URLs (or of `{"url"}` objects), or null."""
    if output is None:
        return ()
    if isinstance(output, str):
        return ({"url": output},) if output.strip() else ()
    if isinstance(output, dict):
        return image_list([output], keys=("url",))
    return image_list(output, keys=("url",))


class ReplicateProvider(HttpProvider):
    name = "replicate"
    dialect = "replicate"

    async def submit(self, task: Task, callback_url: str, uploads: Sequence[Upload] = ()) -> Submission:
        model = task.model or ""
        model_input = dict(task.request)  # {"prompt", …params}, validated by the catalog
        events = list(dict.fromkeys(model_input.pop(EVENTS_PARAM, None) or DEFAULT_EVENTS))
        if "completed" not in events:  # without it the task could never finish
            events.append("completed")
        body: JSON = {"input": model_input, "webhook": callback_url, "webhook_events_filter": events}
        if "/" in model and ":" not in model:  # owner/name: the model's latest version
            url = f"{self.settings.url}/v1/models/{model}/predictions"
        else:  # a version id, bare or as owner/name:version
            body["version"] = model.rpartition(":")[2]
            url = f"{self.settings.url}/v1/predictions"
        response = await self.call("POST", url, json=body)
        answer = json_object(response, self.name)
        upstream = answer.get("id") if isinstance(answer.get("id"), str) and answer["id"] else None
        if upstream is None:
            raise self.garbled("Replicate accepted the request but named no prediction id.", response, answer)
        report = None
        status = answer.get("status")
        if isinstance(status, str) and status in _TERMINAL:  # it finished (or failed) within the request
            try:
                report = ReplicateDialect().parse(answer)
            except InvalidPayload as exc:
                raise self.garbled("Replicate answered a prediction of an unknown shape.", response, answer) from exc
        return Submission(upstream, report=report, raw=answer)


class ReplicateSignature:
    """Standard Webhooks verification under the account's `whsec_` secret.

    The `standardwebhooks` library computes the expected signature
    (`Webhook.sign`); the ±5 minute window is checked here against the
    receiver's clock, because `Webhook.verify` reads `datetime.now()` itself and
    cannot be given a clock (tests and replays need one). Its `verify` would
    also raise ValueError / binascii.Error on malformed headers; here every
    malformed input is an InvalidProviderSignature.
    """

    name = "replicate"

    def __init__(self, secret: Secret | None, *, clock: Clock = system_clock) -> None:
        # A comma list while the secret is rotated: a signature under any of them verifies.
        self._webhooks = [Webhook(part) for part in whsec_secrets(str(secret))] if secret is not None else []
        self.clock = clock

    @property
    def configured(self) -> bool:
        return bool(self._webhooks)

    @property
    def unchecked_warning(self) -> str:
        return (
            "provider_signature_not_checked: RECEIVER_REPLICATE_WEBHOOK_SECRET is not set, "
            "so Replicate's webhook signature was not verified"
        )

    async def verify(self, body: bytes, headers: Mapping[str, str]) -> None:
        assert self._webhooks, "verify() needs a configured secret"
        msg_id = headers.get("webhook-id", "").strip()
        stamp = headers.get("webhook-timestamp", "")
        signatures = headers.get("webhook-signature", "")
        if not (msg_id and stamp and signatures):
            raise self._refused(
                "missing_headers", "The webhook-id, webhook-timestamp and webhook-signature headers are required."
            )
        timestamp = signed_timestamp(self.name, stamp, now=self.clock())
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self._refused("malformed_body", "The signed body is not UTF-8.") from exc
        moment = datetime.fromtimestamp(timestamp, UTC)
        signed = [webhook.sign(msg_id, moment, text) for webhook in self._webhooks]
        expected = [base64.b64decode(signature.partition(",")[2]) for signature in signed]
        # `webhook-signature` is a space-separated list of `v1,<base64>`; one match (under any of the
        # configured secrets) is enough, and entries of other versions or shapes are skipped, as the spec asks.
        for candidate in signatures.split():
            version, comma, value = candidate.partition(",")
            if version != "v1" or not comma:
                continue
            try:
                given = base64.b64decode(value, validate=True)
            except binascii.Error:
                continue
            if any(hmac.compare_digest(digest, given) for digest in expected):
                return
        raise self._refused("mismatch", "No webhook-signature matches the body under the configured secret.")

    def _refused(self, reason: str, message: str) -> InvalidProviderSignature:
        return InvalidProviderSignature(self.name, reason, message)
