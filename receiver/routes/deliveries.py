"""The delivery log: every delivery with its attempts, and sending one again."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from receiver.errors import Conflict, InvalidRequest, NotFound, json_response
from receiver.routes import context, cursors, query_int
from receiver.routes.subscriptions import enabled_or_409
from receiver.store.base import Delivery, DeliveryQuery
from receiver.types import DeliveryStatus


async def _delivery_or_404(request: Request) -> Delivery:
    delivery_id = request.path_params["delivery_id"]
    found = await context(request).store.get_delivery(delivery_id)
    if found is None:
        raise NotFound(f"No delivery {delivery_id}.", code="delivery_not_found", details={"delivery_id": delivery_id})
    return found


async def list_deliveries(request: Request) -> Response:
    params = request.query_params
    status = params.get("status") or None
    if status is not None and status not in DeliveryStatus.__members__.values():
        raise InvalidRequest(
            f"'status' must be one of: {', '.join(s.value for s in DeliveryStatus)}.", details={"field": "status"}
        )
    limit = query_int(request, "limit", 50, low=1, high=100)
    query = DeliveryQuery(
        subscription_id=params.get("subscription_id") or None,
        task_id=params.get("task_id") or None,
        status=DeliveryStatus(status) if status else None,
        before_id=cursors.decode(params.get("cursor")),
        limit=limit + 1,  # one more: is there a next page?
    )
    deliveries, next_cursor = cursors.page(await context(request).store.list_deliveries(query), limit)
    return json_response({"data": [d.to_api() for d in deliveries], "next_cursor": next_cursor})


async def get_delivery(request: Request) -> Response:
    return json_response((await _delivery_or_404(request)).to_api())


async def retry_delivery(request: Request) -> Response:
    """Send a delivery that ended (failed, or succeeded) again now, with the same webhook-id."""
    ctx = context(request)
    delivery = await _delivery_or_404(request)
    if delivery.status is DeliveryStatus.PENDING:
        raise _still_pending(delivery)
    subscription = await ctx.store.get_subscription(delivery.subscription_id)
    if subscription is None:
        raise _subscription_gone(delivery)
    enabled_or_409(subscription)
    retried = await ctx.store.retry_delivery(delivery.id, now=ctx.clock())
    if retried is not None:
        return json_response(retried.to_api(), 202)
    # Something changed since it was read above: deleted, its subscription deleted, or made pending
    # by a retry racing this one (on this instance or another), which sends it, once.
    now = await ctx.store.get_delivery(delivery.id)
    if now is None:
        raise NotFound(f"No delivery {delivery.id}.", code="delivery_not_found", details={"delivery_id": delivery.id})
    if now.status is DeliveryStatus.PENDING:
        raise _still_pending(now)
    raise _subscription_gone(delivery)


def _still_pending(delivery: Delivery) -> Conflict:
    return Conflict(
        f"Delivery {delivery.id} is still pending; its next attempt is already scheduled.",
        code="delivery_pending",
        details={"delivery_id": delivery.id, "next_attempt_at": delivery.to_api()["next_attempt_at"]},
    )


def _subscription_gone(delivery: Delivery) -> Conflict:
    return Conflict(
        f"The subscription of delivery {delivery.id} was deleted.",
        code="subscription_not_found",
        details={"delivery_id": delivery.id, "subscription_id": delivery.subscription_id},
    )


routes = [
    Route("/deliveries", list_deliveries, methods=["GET"]),
    Route("/deliveries/{delivery_id}", get_delivery, methods=["GET"]),
    Route("/deliveries/{delivery_id}/retry", retry_delivery, methods=["POST"]),
]
