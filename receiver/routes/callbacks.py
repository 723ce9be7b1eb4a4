"""Callback ingress: `POST /callbacks/{token}` (and `/callback` appended, as apimart does; either with a
trailing slash)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from receiver import selftest
from receiver.errors import ApiError, json_response
from receiver.ingest import ingest
from receiver.logs import get_logger
from receiver.routes import context, read_body
from receiver.types import Verdict

log = get_logger("receiver.callbacks")


async def receive_callback(request: Request) -> Response:
    ctx = context(request)
    try:
        claims = ctx.signer.open(request.path_params["token"])
        if claims.scope == selftest.SCOPE:  # `receiver doctor` checking the tunnel: nothing is stored
            return selftest.answer(request, ctx, claims)
        body = await read_body(request, ctx.settings.max_body_bytes)
        applied = await ingest(ctx, claims, body, request.headers)
    except ApiError as exc:
        ctx.metrics.callbacks.labels(exc.code).inc()
        log.info("callback.refused", code=exc.code, status=exc.status_code)
        raise
    verdict = applied.verdict
    ctx.metrics.callbacks.labels(verdict.value).inc()
    answer = {"ok": True, "task_id": applied.task.id, "duplicate": verdict is Verdict.DUPLICATE}
    if verdict is Verdict.IGNORED:
        answer["ignored"] = True
        answer["reason"] = applied.transition.reason
    return json_response(answer)


# With a trailing slash too: a sender that adds one gets the callback taken, not a redirect
# (senders do not follow redirects of a POST).
routes = [
    Route(path, receive_callback, methods=["POST"])
    for path in (
        "/callbacks/{token}",
        "/callbacks/{token}/",
        "/callbacks/{token}/callback",
        "/callbacks/{token}/callback/",
    )
]
