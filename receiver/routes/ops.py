"""Operations: health, readiness, metrics and the OpenAPI document."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from receiver.auth import ApiKeys
from receiver.errors import Unauthorized, json_response
from receiver.openapi import document
from receiver.routes import context


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    problem = await context(request).store.check_ready()
    if problem is not None:  # the error shape, with `status` and `reason` kept beside it for probes
        error = {"code": "not_ready", "message": f"Not ready: {problem}."}
        return json_response({"error": error, "status": "unavailable", "reason": problem}, 503, {"retry-after": "1"})
    return json_response({"status": "ready"})


async def metrics(request: Request) -> Response:
    ctx = context(request)
    tokens = ctx.settings.metrics_tokens
    # Checked as the API keys are (digests compared in constant time: receiver.auth); a comma list
    # while the token is rotated.
    if tokens and ApiKeys([str(t) for t in tokens]).check_header(request.headers.get("authorization")) is None:
        raise Unauthorized("/metrics needs 'Authorization: Bearer <RECEIVER_METRICS_TOKEN>'.")
    body = ctx.metrics.render(await ctx.store.counts())
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


async def openapi(request: Request) -> Response:
    return json_response(document(context(request).settings.public_url))


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]
