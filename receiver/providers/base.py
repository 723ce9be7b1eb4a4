"""The Provider and Dialect protocols, and the HTTP plumbing providers share.

A *provider* submits tasks upstream; a *dialect* reads the callbacks a
provider (or another service's provider) posts back. Each provider module
implements both for its own API.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import httpx
import orjson

from receiver.config import ProviderSettings
from receiver.errors import InvalidPayload, ProviderError
from receiver.nesting import MAX_DEPTH, too_deep
from receiver.tasks import Report, Task
from receiver.types import JSON, TaskState


@dataclass(frozen=True, slots=True)
class Upload:
    """A reference file the client uploaded (multipart), forwarded as is."""

    field: str
    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Submission:
    """What the provider answered to a submission.

    `report` is set when the answer already tells the outcome (a synchronous
    provider, or one that finished at once); `poll_url` when the result must
    be fetched by polling.
    """

    upstream_task_id: str | None
    report: Report | None = None
    poll_url: str | None = None
    raw: JSON = field(default_factory=dict)


class Provider(Protocol):
    """Submits tasks to one upstream API."""

    name: str
    dialect: str  # the callback dialect its callbacks speak

    async def submit(self, task: Task, callback_url: str, uploads: Sequence[Upload] = ()) -> Submission:
        """Send `task` upstream; raise ProviderError if it is refused or unreachable."""


@dataclass(frozen=True, slots=True)
class Answer:
    """An upstream answer read in the background (a poll, a synchronous call), as the callback log keeps it."""

    body: bytes
    payload: JSON
    content_type: str | None = None


@runtime_checkable
class Poller(Protocol):
    """A provider whose results are pulled: the receiver polls `Submission.poll_url` (receiver/polling.py)."""

    name: str

    async def poll(self, poll_url: str) -> tuple[Answer, Report]:
        """Read the task at `poll_url`. ProviderError if the poll failed (unreachable, an error status,
        not JSON) and InvalidPayload if the task object is unreadable: either way it is tried again later."""


@runtime_checkable
class SyncProvider(Protocol):
    """A provider whose answer is the HTTP response itself, which may take minutes: the receiver
    calls it from a background job of kind `name` (receiver/sync_calls.py), never while a client waits."""

    name: str
    dialect: str

    async def generate(self, task: Task, *, timeout: float) -> Answer:
        """Make the call; ProviderError if it is refused, times out or answers garbage."""

    def read(self, payload: JSON) -> Report:
        """The report in a successful answer (images may be inline `b64_json`); InvalidPayload if unreadable."""


class Dialect(Protocol):
    """Reads one callback shape into a Report."""

    name: str

    def detect(self, payload: JSON) -> bool:
        """Does `payload` look like this dialect (for `auto`)?"""

    def parse(self, payload: JSON) -> Report:
        """The report in `payload`; InvalidPayload if it is not this dialect."""


class HttpProvider:
    """What the providers that submit over HTTP share: their settings, the app's client, the
    submission timeout, one upstream call with the usual headers, and how a garbled answer fails."""

    name: str
    dialect: str

    def __init__(self, settings: ProviderSettings, client: httpx.AsyncClient, *, timeout: float) -> None:
        self.settings = settings
        self.client = client
        self.timeout = timeout

    def headers(self) -> dict[str, str]:
        """The headers of every call (the API key as a bearer token unless the provider says otherwise)."""
        return bearer_headers(self.settings)

    async def call(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """`call` under this provider's name, timeout and headers."""
        return await call(
            self.client, method, url, provider=self.name, timeout=self.timeout, headers=self.headers(), **kwargs
        )

    def answered_images(self, items: Any, upstream: str | None, response: httpx.Response, answer: JSON) -> Report:
        """The result a submission answered at once (`data: [{"url"}, …]`); garbled if of another shape."""
        try:
            return Report(TaskState.SUCCEEDED, upstream, images=image_list(items), dialect=self.name)
        except InvalidPayload as exc:
            raise self.garbled(f"{self.name} answered images of an unknown shape.", response, answer) from exc

    def garbled(self, message: str, response: httpx.Response, answer: JSON) -> ProviderError:
        return ProviderError(
            message, provider=self.name, code="upstream_garbled", status_code=response.status_code, body=answer
        )


def bearer_headers(settings: ProviderSettings, scheme: str = "Bearer") -> dict[str, str]:
    """JSON in, and the provider's API key under `scheme` (fal's is `Key`)."""
    headers = {"accept": "application/json"}
    if settings.api_key is not None:
        headers["authorization"] = f"{scheme} {settings.api_key}"
    return headers


async def call(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    provider: str,
    timeout: float,
    **kwargs: Any,
) -> httpx.Response:
    """One upstream request; transport failures and error statuses become ProviderError."""
    try:
        response = await client.request(method, url, timeout=timeout, follow_redirects=False, **kwargs)
    except httpx.TimeoutException as exc:
        raise ProviderError(
            f"{provider} did not answer within {timeout:g} s.", provider=provider, code="upstream_timeout"
        ) from exc
    except httpx.HTTPError as exc:
        raise ProviderError(
            f"{provider} could not be reached: {type(exc).__name__}.", provider=provider, code="upstream_unreachable"
        ) from exc
    if response.status_code >= 400:
        raise refusal(provider, response)
    return response


_REFUSAL_CODES = {
    400: "upstream_invalid_parameters",
    401: "upstream_unauthorized",
    402: "upstream_billing",
    403: "upstream_forbidden",
    404: "upstream_not_found",
    429: "upstream_rate_limited",
}


def refusal(provider: str, response: httpx.Response) -> ProviderError:
    """A ProviderError for an error status: our code for the status (`_REFUSAL_CODES`), the
    provider's own message when it gives one, and its body (its own error code stays in there)."""
    body: Any
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        body = response.text[:1024] or None
    body = _storable(body, response)
    code = _REFUSAL_CODES.get(response.status_code, "upstream_error")
    message = f"{provider} answered HTTP {response.status_code}."
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        if isinstance(error.get("message"), str):
            message = f"{provider}: {error['message']}"
    elif isinstance(error, str):
        message = f"{provider}: {error}"
    elif isinstance(body, dict) and isinstance(body.get("detail"), str):
        message = f"{provider}: {body['detail']}"
    return ProviderError(message, provider=provider, code=code, status_code=response.status_code, body=body)


def json_object(response: httpx.Response, provider: str) -> JSON:
    """The answer's JSON object; ProviderError if it is anything else."""
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError as exc:
        raise ProviderError(
            f"{provider} answered something that is not JSON.",
            provider=provider,
            code="upstream_garbled",
            status_code=response.status_code,
            body=response.text[:1024],
        ) from exc
    if not isinstance(body, dict) or too_deep(body):
        raise ProviderError(
            f"{provider} answered JSON that is not an object (or nests more than {MAX_DEPTH} levels).",
            provider=provider,
            code="upstream_garbled",
            status_code=response.status_code,
            body=_storable(body, response),
        )
    return body


def _storable(body: Any, response: httpx.Response) -> Any:
    """`body` as a task error may keep it: one nested too deep for orjson to write back out
    (nesting.py) would make the task unreadable, so its first 1024 characters are kept instead."""
    return response.text[:1024] if too_deep(body) else body


# --- helpers for dialect parsers ------------------------------------------------


def optional_str(payload: Mapping[str, Any], key: str) -> str | None:
    """`payload[key]` if it is a non-empty string (numbers are accepted as ids), else None."""
    value = payload.get(key)
    if isinstance(value, bool):
        raise InvalidPayload(f"'{key}' must be a string.")
    if isinstance(value, int):
        return str(value)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidPayload(f"'{key}' must be a string.")
    return value


def error_object(value: Any, default_code: str) -> JSON:
    """Normalise a provider's error (object, string or missing) to `{code, message}`."""
    if isinstance(value, dict):
        code = value.get("code")
        message = value.get("message")
        return {
            "code": str(code) if isinstance(code, (str, int)) and not isinstance(code, bool) else default_code,
            "message": message if isinstance(message, str) else "The provider reported a failure.",
        }
    if isinstance(value, str) and value:
        return {"code": default_code, "message": value}
    return {"code": default_code, "message": "The provider reported a failure."}


def image_list(items: Any, *, keys: Sequence[str] = ("url", "revised_prompt", "b64_json")) -> tuple[JSON, ...]:
    """`[{"url": …}, …]` kept to known keys; InvalidPayload if the shape is wrong.

    An empty (or blank) URL or `b64_json` is no image: it is left out, so a success that names
    nothing else fails as `empty_result`, as one with no images does."""
    if not isinstance(items, list):
        raise InvalidPayload("The images must be a list.")
    images = []
    for item in items:
        if isinstance(item, str):
            if item.strip():
                images.append({"url": item})
            continue
        if not isinstance(item, dict):
            raise InvalidPayload("Each image must be an object or a URL.")
        image = {k: item[k] for k in keys if isinstance(item.get(k), str)}
        blank = [k for k in _IMAGE_SOURCES if k in image and not image[k].strip()]
        for k in blank:
            del image[k]
        if "url" not in image and "b64_json" not in image:
            if blank:
                continue
            raise InvalidPayload("An image has neither 'url' nor 'b64_json'.")
        images.append(image)
    return tuple(images)


_IMAGE_SOURCES = ("url", "b64_json")
