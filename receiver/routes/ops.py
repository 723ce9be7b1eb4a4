"""Operations: health, readiness, metrics and the OpenAPI document."""

from __future__ import annotations

import hashlib
import hmac

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from receiver.errors import Unauthorized, json_response
from receiver.openapi import document
from receiver.routes import context


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    problem = await context(request).store.check_ready()
    if problem is not None:
        return json_response({"status": "unavailable", "reason": problem}, 503)
    return json_response({"status": "ready"})


async def metrics(request: Request) -> Response:
    ctx = context(request)
    token = ctx.settings.metrics_token
    if token is not None:
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        # Compared as SHA-256 digests: equal lengths, so the time taken tells nothing about the token's.
        given = hashlib.sha256(presented.strip().encode()).digest()
        wanted = hashlib.sha256(str(token).encode()).digest()
        if not (hmac.compare_digest(given, wanted) and scheme.lower() == "bearer"):
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
