"""The receiver's exceptions, and the one place they become HTTP answers.

ReceiverError
├── ApiError                   answered to the client as {"error": {...}}
│   ├── InvalidParameters      400 invalid_parameters (details.fields)
│   ├── InvalidPayload         400 invalid_payload
│   ├── InvalidRequest         400 invalid_request
│   ├── UrlNotAllowed          400 url_not_allowed
│   ├── Unauthorized           401 unauthorized
│   ├── InvalidSignature       403 invalid_signature
│   │   └── InvalidProviderSignature  403 invalid_provider_signature
│   ├── NotFound               404 <thing>_not_found
│   ├── Conflict               409 <reason>
│   │   └── TaskMismatch       409 task_mismatch
│   ├── RequestTimeout         408 request_timeout (a body sent too slowly)
│   ├── CallbackExpired        410 callback_expired
│   ├── PayloadTooLarge        413 payload_too_large
│   ├── TooManyRequests        429 <limit>_exceeded (Retry-After)
│   ├── ProviderRefused        502 with the provider's error and the failed task
│   └── SignatureKeysUnavailable  503 provider_keys_unavailable (Retry-After)
├── ProviderError              an upstream call failed (refused, unreachable, garbled)
├── AssetUnavailable           an image to keep could not be downloaded (code, retryable)
└── StoreError                 the database could not do what was asked (503 store_unavailable)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from receiver.logs import get_logger, redact_path

log = get_logger("receiver.errors")


class ReceiverError(Exception):
    """Base class of every error the receiver raises on purpose."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Subclasses take other constructor arguments than `args`; travel as class + state (the
        # SQLite writer runs in its own process and sends errors back).
        return (_rebuilt, (type(self), self.args, self.__dict__))


def _rebuilt(cls: type[ReceiverError], args: tuple[Any, ...], state: dict[str, Any]) -> ReceiverError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class ApiError(ReceiverError):
    """An error answered to the client in the contract's error shape."""

    status_code = 400
    code = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = dict(details) if details else None
        self.headers = dict(headers) if headers else None

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            error["details"] = self.details
        return {"error": error}


class InvalidParameters(ApiError):
    """The request names fields a provider or model would refuse."""

    status_code = 400
    code = "invalid_parameters"

    def __init__(self, fields: Sequence[Mapping[str, str]], message: str | None = None) -> None:
        self.fields = [dict(f) for f in fields]
        names = ", ".join(f["field"] for f in self.fields)
        super().__init__(message or f"Invalid parameters: {names}.", details={"fields": self.fields})


class InvalidPayload(ApiError):
    """A callback body is not a JSON object or no dialect recognises it."""

    status_code = 400
    code = "invalid_payload"


class InvalidRequest(ApiError):
    """A management request is malformed (bad JSON, wrong types, bad cursor)."""

    status_code = 400
    code = "invalid_request"


class UrlNotAllowed(ApiError):
    """A subscriber or asset URL points somewhere the receiver must not call."""

    status_code = 400
    code = "url_not_allowed"


class Unauthorized(ApiError):
    """Missing or wrong API key."""

    status_code = 401
    code = "unauthorized"

    def __init__(self, message: str = "A valid API key is required (Authorization: Bearer <key>).") -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="receiver"'})


class InvalidSignature(ApiError):
    """A callback token that was not signed by this receiver."""

    status_code = 403
    code = "invalid_signature"


class InvalidProviderSignature(InvalidSignature):
    """A callback whose provider signature (Replicate's, fal's) is missing, stale or wrong."""

    code = "invalid_provider_signature"

    def __init__(self, provider: str, reason: str, message: str) -> None:
        super().__init__(message, details={"provider": provider, "reason": reason})
        self.provider = provider
        self.reason = reason


class NotFound(ApiError):
    """The named thing does not exist."""

    status_code = 404
    code = "not_found"


class Conflict(ApiError):
    """The request conflicts with the stored state."""

    status_code = 409
    code = "conflict"


class TaskMismatch(Conflict):
    """A callback names another upstream task than the one its token was minted for, or (`taken`)
    an upstream task that another task of the same provider already has: a task learns its
    upstream id from its first callback, and one upstream task belongs to one task."""

    code = "task_mismatch"

    def __init__(self, task_id: str, expected: str | None, got: str | None, *, taken: bool = False) -> None:
        details: dict[str, Any] = {"task_id": task_id, "upstream_task_id": expected, "payload_task_id": got}
        if taken:  # the other task is not named: the caller holds this task's URL only
            message = f"The payload names upstream task {got!r}, which another task has already taken."
            details["reason"] = "upstream_task_taken"
        else:
            message = (
                f"This callback URL belongs to task {task_id}, whose upstream task is {expected!r}; "
                f"the payload names {got!r}."
            )
        super().__init__(message, details=details)
        self.task_id = task_id


#: The request scope's key for the RequestTimeout the HTTP protocol answered a body's deadline with
#: (receiver.protocol): the route then sees a disconnect, and counts and logs the 408 by this.
BODY_TIMED_OUT = "receiver.body_timed_out"


class RequestTimeout(ApiError):
    """A client took longer than the server allows to send a request's body."""

    status_code = 408
    code = "request_timeout"

    def __init__(self, message: str, *, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message, details=details, headers={"Connection": "close"})


class HeaderFieldsTooLarge(ApiError):
    """A request line and headers larger than the configured limit (answered by receiver.protocol)."""

    status_code = 431
    code = "request_header_fields_too_large"


class CallbackExpired(ApiError):
    """A correctly signed callback token that is past its validity."""

    status_code = 410
    code = "callback_expired"


class PayloadTooLarge(ApiError):
    """A request body larger than the configured limit. The answer goes as soon as the limit is
    passed; what the client still sends is discarded briefly, then the connection is closed
    (receiver.protocol's lingering close)."""

    status_code = 413
    code = "payload_too_large"


class TooManyRequests(ApiError):
    """One client asks for more than a limit allows; `Retry-After` says when to try again."""

    status_code = 429
    code = "rate_limited"

    def __init__(self, message: str, *, code: str, retry_after: int, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message, code=code, details=details, headers={"Retry-After": str(retry_after)})


class ProviderRefused(ApiError):
    """The provider refused a submission; the task is stored as failed."""

    status_code = 502
    code = "provider_error"

    def __init__(self, error: ProviderError, task: Mapping[str, Any]) -> None:
        super().__init__(error.message, code=error.code, details=error.details)
        self.task = dict(task)

    def body(self) -> dict[str, Any]:
        body = super().body()
        body["task"] = self.task
        return body


class SignatureKeysUnavailable(ApiError):
    """The provider's public keys cannot be fetched and none are cached: the callback
    may be genuine, so the provider is asked to retry rather than told it is forged."""

    status_code = 503
    code = "provider_keys_unavailable"

    def __init__(self, provider: str, message: str, *, retry_after: int) -> None:
        super().__init__(message, details={"provider": provider}, headers={"Retry-After": str(retry_after)})
        self.provider = provider


class ProviderError(ReceiverError):
    """An upstream provider call failed: refused, unreachable or garbled."""

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        code: str = "upstream_error",
        status_code: int | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.provider = provider
        self.code = code
        self.status_code = status_code
        self.body = body

    @property
    def details(self) -> dict[str, Any]:
        details: dict[str, Any] = {"provider": self.provider}
        if self.status_code is not None:
            details["status_code"] = self.status_code
        if self.body is not None:
            details["body"] = self.body
        return details

    def as_task_error(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, **self.details}


class AssetUnavailable(ReceiverError):
    """An image the receiver was to keep could not be downloaded (receiver.mirror).

    `code`: download_failed, asset_too_large, not_an_image, url_not_allowed or asset_store_failed
    (the disk); `retryable`: the reason may pass (a timeout, a refused connection, 5xx, 429, a full
    disk), so trying again later makes sense.
    """

    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable

    def as_error(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class StoreError(ReceiverError):
    """The database could not do what was asked."""


def json_response(body: Any, status_code: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """A JSON answer serialised with orjson (what every route uses)."""
    return Response(
        orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS),
        status_code=status_code,
        headers=headers,
        media_type="application/json",
    )


_HTTP_CODES = {
    404: ("not_found", "No such endpoint."),
    405: ("method_not_allowed", "This endpoint does not accept that method."),
}


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return json_response(exc.body(), exc.status_code, exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code, message = _HTTP_CODES.get(exc.status_code, ("http_error", str(exc.detail)))
    return json_response({"error": {"code": code, "message": message}}, exc.status_code, exc.headers)


async def _store_error(request: Request, exc: Exception) -> Response:
    # The database is down or its writer is restarting: the request may be retried, and nothing
    # was acknowledged, so nothing is lost.
    log.error("request.store_unavailable", path=redact_path(request.url.path), error=str(exc)[:300])
    body = {"error": {"code": "store_unavailable", "message": "The database is not available; retry shortly."}}
    return json_response(body, 503, {"retry-after": "1"})


def body_cut_off(request: Request) -> RequestTimeout | None:
    """The 408 the HTTP protocol answered when `request`'s body missed its deadline, if it did: the
    route then sees a disconnect (ClientDisconnect) where the body should be."""
    timed_out = request.scope.get(BODY_TIMED_OUT)
    return timed_out if isinstance(timed_out, RequestTimeout) else None


async def _client_gone(request: Request, exc: Exception) -> Response:
    # The body never came whole: nothing was stored or acknowledged, and there is no one to answer.
    timed_out = body_cut_off(request)
    if timed_out is not None:  # what the protocol sent, for the access log
        return await _api_error(request, timed_out)
    # The client hung up (a provider that timed out).
    log.info("http.client_disconnected", method=request.method, path=redact_path(request.url.path))
    return Response(status_code=499)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("request.crashed", path=redact_path(request.url.path), error=repr(exc)[:300])
    body = {"error": {"code": "internal_error", "message": "The receiver failed to handle this request."}}
    return json_response(body, 500)


EXCEPTION_HANDLERS: dict[Any, Any] = {
    ApiError: _api_error,
    StoreError: _store_error,
    HTTPException: _http_error,
    ClientDisconnect: _client_gone,
    Exception: _server_error,
}
