"""Assets the receiver serves itself: `GET /assets/{token}` (images providers answered inline).

Authorised by the signed URL alone, like a callback URL, so an `<img src>` works;
the content never changes under a name (it is its hash), so it is cached for good.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from receiver.routes import context

_CACHE = "public, max-age=31536000, immutable"


async def get_asset(request: Request) -> Response:
    found = await context(request).assets.resolve(request.path_params["token"])
    etag = f'"{found.sha256}"'
    headers = {"cache-control": _CACHE, "etag": etag, "x-content-type-options": "nosniff"}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return FileResponse(found.path, media_type=found.media_type, headers=headers)


routes = [Route("/assets/{token}", get_asset, methods=["GET"])]
