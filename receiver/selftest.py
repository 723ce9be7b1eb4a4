"""The self-test callback: proof that a public URL reaches this very receiver.

    token = mint(ctx.signer, nonce)          # `receiver doctor`, with the receiver's own secrets
    POST {RECEIVER_PUBLIC_URL}/callbacks/{token}
    → 200 {"ok": true, "self_test": true, "nonce", "instance", "public_url", "scheme", …}

A callback token whose scope is SCOPE names no task: the callback route
answers it at once with who answered — this process's instance id, the public
URL it was started with, the scheme and client address it saw (after the
trusted proxy headers) — and stores nothing, so a self-test never leaves a
task or a callback behind. Only someone holding RECEIVER_SECRET_KEY can mint
one, and it is valid for MAX_AGE seconds.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from receiver import __version__
from receiver.context import Context
from receiver.errors import json_response
from receiver.logs import get_logger
from receiver.signing import CallbackSigner, Claims

SCOPE = "self-test"
MAX_AGE = 300

log = get_logger("receiver.selftest")


def mint(signer: CallbackSigner, nonce: str) -> str:
    return signer.mint(nonce, max_age=MAX_AGE, scope=SCOPE)


def answer(request: Request, ctx: Context, claims: Claims) -> Response:
    log.info("callback.self_test", instance=ctx.instance_id, scheme=request.url.scheme)
    return json_response(
        {
            "ok": True,
            "self_test": True,
            "nonce": claims.subject,
            "instance": ctx.instance_id,
            "public_url": ctx.settings.public_url,
            "scheme": request.url.scheme,
            "client": request.client.host if request.client else None,
            "version": __version__,
        }
    )
