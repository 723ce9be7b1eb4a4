"""The dashboard: `GET /ui`, one page of plain HTML, JavaScript and CSS from receiver/ui/.

The page and its three files need no key (they hold no data); every data call
the page makes does, with the key the user typed, kept in the tab's session
storage and sent as a bearer header. The page is served under a strict
Content-Security-Policy: scripts and styles from this origin only (no inline
code, no eval, no HTML from strings: Trusted Types admit none), requests to
this origin only, images from this origin (kept assets) or any https URL (the
provider's own image, when it was not kept), and no framing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib.resources import files

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' https:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
        "require-trusted-types-for 'script'",
        "trusted-types 'none'",
    )
)

HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}

#: What /ui serves: path -> (file in receiver/ui, media type, cache-control).
FILES = {
    "/ui": ("index.html", "text/html; charset=utf-8", "no-store"),
    "/ui/app.js": ("app.js", "text/javascript; charset=utf-8", "no-cache"),
    "/ui/app.css": ("app.css", "text/css; charset=utf-8", "no-cache"),
    "/ui/favicon.svg": ("favicon.svg", "image/svg+xml", "no-cache"),
}


def _serving(name: str, media_type: str, caching: str) -> Callable[[Request], Awaitable[Response]]:
    body = files("receiver").joinpath("ui", name).read_bytes()  # read once, at import: a few KiB
    headers = {**HEADERS, "cache-control": caching}

    async def serve(request: Request) -> Response:
        return Response(body, media_type=media_type, headers=headers)

    return serve


routes = [Route(path, _serving(*served), methods=["GET"]) for path, served in FILES.items()]
