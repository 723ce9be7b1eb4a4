"""The baseline: a bare Starlette endpoint that parses a JSON callback and answers.

Whatever the receiver does per callback (token, dialect, state machine, durable
write, outbox) is measured against this, in the same run, on the same machine.
"""

from __future__ import annotations

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


async def callback(request: Request) -> Response:
    payload = orjson.loads(await request.body())
    return Response(orjson.dumps({"ok": True, "keys": len(payload)}), media_type="application/json")


app = Starlette(routes=[Route("/callbacks/{token}", callback, methods=["POST"])])
