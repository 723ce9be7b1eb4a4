"""Subscriptions: create, list, read, change, delete, rotate the secret, test, recover.

A secret is shown in full only in the answers to creation and rotation;
everywhere else it is masked.
"""

from __future__ import annotations

import math
from base64 import b64decode
from binascii import Error as Base64Error
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from receiver.clock import isoformat, parse_iso
from receiver.config import new_webhook_secret
from receiver.context import Context
from receiver.errors import Conflict, InvalidParameters, NotFound, UrlNotAllowed, json_response
from receiver.ids import new_id
from receiver.routes import Problems, context, read_fields
from receiver.store.base import Subscription
from receiver.types import EventType

#: How long the previous secret keeps verifying after a rotation (seconds).
ROTATION_OVERLAP = 86400.0
#: What `events` may list: exact task event types, or "*" for all of them (ping always comes).
EVENT_FILTERS = ("*", *(e.value for e in EventType if e is not EventType.PING))
SECRET_BYTES = (24, 64)
MAX_DESCRIPTION = 500
#: The latest `since` taken: 9999-12-31T23:59:59Z, the end of what ISO-8601 times here can name.
LATEST_SINCE = 253402300799.0

_CREATE_FIELDS = frozenset({"url", "events", "description", "secret"})
_PATCH_FIELDS = frozenset({"url", "events", "enabled", "description"})


def _url(value: Any, problems: Problems) -> str | None:
    if not isinstance(value, str) or not value.strip():
        problems.append({"field": "url", "message": "is required: the endpoint's http(s) URL"})
        return None
    return value.strip()


def _with_url_form(ctx: Context, url: str | None, problems: Problems) -> Problems:
    """`problems`, and the URL's if its form is wrong: a request with several bad fields hears of
    them all at once (a URL alone that may not be called is `url_not_allowed`, from the guard)."""
    if url is not None:
        try:
            ctx.url_guard.parse(url)
        except UrlNotAllowed as exc:
            return [{"field": "url", "message": exc.message}, *problems]
    return problems


def _events(value: Any, problems: Problems) -> tuple[str, ...] | None:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(item, str) and item in EVENT_FILTERS for item in value)
    ):
        problems.append({"field": "events", "message": f"must be a non-empty list of: {', '.join(EVENT_FILTERS)}"})
        return None
    return tuple(dict.fromkeys(value))


def _description(value: Any, problems: Problems) -> str | None:
    if value is not None and (not isinstance(value, str) or len(value) > MAX_DESCRIPTION or "\x00" in value):
        message = f"must be a string of at most {MAX_DESCRIPTION} characters, without NUL"
        problems.append({"field": "description", "message": message})
        return None
    return value


def _secret(value: Any, problems: Problems) -> str | None:
    """A `whsec_` secret given by the client, checked; None when none was given (one is generated)."""
    if value is None:
        return None
    low, high = SECRET_BYTES
    message = f"must be 'whsec_' followed by the base64 of {low} to {high} random bytes"
    if not isinstance(value, str) or not value.startswith("whsec_"):
        problems.append({"field": "secret", "message": message})
        return None
    try:
        key = b64decode(value.removeprefix("whsec_"), validate=True)
    except (Base64Error, ValueError):
        key = b""
    if not low <= len(key) <= high:
        problems.append({"field": "secret", "message": message})
        return None
    return value


def _not_found(subscription_id: str) -> NotFound:
    return NotFound(
        f"No subscription {subscription_id}.",
        code="subscription_not_found",
        details={"subscription_id": subscription_id},
    )


async def _subscription_or_404(request: Request) -> Subscription:
    subscription_id = request.path_params["subscription_id"]
    found = await context(request).store.get_subscription(subscription_id)
    if found is None:
        raise _not_found(subscription_id)
    return found


def enabled_or_409(subscription: Subscription) -> None:
    """Refuse to queue anything for a disabled subscription: it would only wait."""
    if not subscription.enabled:
        raise Conflict(
            f"Subscription {subscription.id} is disabled ({subscription.disabled_reason}); enable it first "
            '(PATCH {"enabled": true}).',
            code="subscription_disabled",
            details={"subscription_id": subscription.id, "disabled_reason": subscription.disabled_reason},
        )


async def create_subscription(request: Request) -> Response:
    ctx = context(request)
    body, problems = await read_fields(request, _CREATE_FIELDS)
    url = _url(body.get("url"), problems)
    events = _events(body.get("events", ["*"]), problems)
    description = _description(body.get("description"), problems)
    secret = _secret(body.get("secret"), problems)
    if problems or url is None or events is None:
        raise InvalidParameters(_with_url_form(ctx, url, problems))
    await ctx.url_guard.check(url)
    now = ctx.clock()
    subscription = Subscription(
        id=new_id("sub", ctx.clock),
        url=url,
        events=events,
        secret=secret or new_webhook_secret(),
        description=description,
        created_at=now,
        updated_at=now,
    )
    await ctx.store.create_subscription(subscription)
    return json_response(subscription.to_api(reveal_secret=True), 201)


async def list_subscriptions(request: Request) -> Response:
    subscriptions = await context(request).store.list_subscriptions()
    return json_response({"data": [s.to_api() for s in subscriptions]})


async def get_subscription(request: Request) -> Response:
    return json_response((await _subscription_or_404(request)).to_api())


async def update_subscription(request: Request) -> Response:
    ctx = context(request)
    subscription = await _subscription_or_404(request)
    body, problems = await read_fields(request, _PATCH_FIELDS)
    changes: dict[str, Any] = {}
    if "url" in body:
        changes["url"] = _url(body["url"], problems)
    if "events" in body:
        changes["events"] = _events(body["events"], problems)
    if "description" in body:
        changes["description"] = _description(body["description"], problems)
    if "enabled" in body:
        if not isinstance(body["enabled"], bool):
            problems.append({"field": "enabled", "message": "must be true or false"})
        elif body["enabled"]:
            # A fresh start: the failure clock that disabled it starts again from zero.
            changes.update(enabled=True, disabled_reason=None, failing_since=None)
        elif subscription.enabled:
            changes.update(enabled=False, disabled_reason="disabled through the API")
    if problems:
        raise InvalidParameters(_with_url_form(ctx, changes.get("url"), problems))
    if "url" in changes:
        await ctx.url_guard.check(changes["url"])
    if not changes:
        return json_response(subscription.to_api())
    updated = await ctx.store.update_subscription(subscription.id, **changes)
    if updated is None:  # deleted meanwhile
        return await get_subscription(request)
    return json_response(updated.to_api())


async def delete_subscription(request: Request) -> Response:
    subscription = await _subscription_or_404(request)
    await context(request).store.delete_subscription(subscription.id)
    return Response(status_code=204)


async def rotate_secret(request: Request) -> Response:
    ctx = context(request)
    subscription = await _subscription_or_404(request)
    body, problems = await read_fields(request, frozenset({"secret"}))
    secret = _secret(body.get("secret"), problems)
    if problems:
        raise InvalidParameters(problems)
    if subscription.uses_notify_secret:
        raise Conflict(
            "A notify_url subscription is signed with RECEIVER_NOTIFY_SECRET; rotate that variable instead.",
            code="notify_secret",
            details={"subscription_id": subscription.id},
        )
    rotated = await ctx.store.update_subscription(
        subscription.id,
        secret=secret or new_webhook_secret(),
        previous_secret=subscription.secret,
        previous_secret_expires_at=ctx.clock() + ROTATION_OVERLAP,
    )
    if rotated is None:  # deleted meanwhile
        raise _not_found(subscription.id)
    return json_response(rotated.to_api(reveal_secret=True))


async def send_test(request: Request) -> Response:
    ctx = context(request)
    subscription = await _subscription_or_404(request)
    enabled_or_409(subscription)
    count = await ctx.store.emit_event(
        EventType.PING, {"subscription_id": subscription.id}, subscription_id=subscription.id
    )
    return json_response({"subscription_id": subscription.id, "event_type": "ping", "deliveries": count}, 202)


def _since(value: Any) -> float:
    problem = {"field": "since", "message": "must be an ISO-8601 time or unix seconds, up to the year 9999"}
    if isinstance(value, bool) or value is None:
        raise InvalidParameters([problem])
    if isinstance(value, int | float):
        try:
            moment = float(value)
        except OverflowError as exc:  # an integer too large for a float
            raise InvalidParameters([problem]) from exc
    elif isinstance(value, str):
        try:
            moment = parse_iso(value.strip())
        except (ValueError, OverflowError) as exc:
            raise InvalidParameters([problem]) from exc
    else:
        raise InvalidParameters([problem])
    # Beyond the year 9999 the time cannot be shown back (isoformat) nor stored everywhere: a 400, not a 500.
    if not math.isfinite(moment) or not 0 <= moment <= LATEST_SINCE:
        raise InvalidParameters([problem])
    return moment


async def recover(request: Request) -> Response:
    """Send again every failed delivery of the subscription created since `since`."""
    ctx = context(request)
    subscription = await _subscription_or_404(request)
    body, problems = await read_fields(request, frozenset({"since"}))
    if problems:
        raise InvalidParameters(problems)
    since = _since(body.get("since"))
    enabled_or_409(subscription)
    count = await ctx.store.recover_deliveries(subscription.id, since=since, now=ctx.clock())
    return json_response({"subscription_id": subscription.id, "since": isoformat(since), "recovered": count}, 202)


routes = [
    Route("/subscriptions", create_subscription, methods=["POST"]),
    Route("/subscriptions", list_subscriptions, methods=["GET"]),
    Route("/subscriptions/{subscription_id}", get_subscription, methods=["GET"]),
    Route("/subscriptions/{subscription_id}", update_subscription, methods=["PATCH"]),
    Route("/subscriptions/{subscription_id}", delete_subscription, methods=["DELETE"]),
    Route("/subscriptions/{subscription_id}/rotate-secret", rotate_secret, methods=["POST"]),
    Route("/subscriptions/{subscription_id}/test", send_test, methods=["POST"]),
    Route("/subscriptions/{subscription_id}/recover", recover, methods=["POST"]),
]
