"""The ASGI application.

    app = create_app(settings)                       # what `receiver serve` runs
    app = create_app(settings, store=store, transport=httpx.MockTransport(handler), clock=clock)

The lifespan opens the store, the shared HTTP client and the background
workers, and closes them in reverse order.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import orjson
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from receiver import __version__, polling, sync_calls
from receiver.assets import AssetStore
from receiver.auth import ApiKeys, BearerAuth
from receiver.clock import system_clock
from receiver.collector import settle_collector
from receiver.config import Settings, ensure_secrets
from receiver.context import Context
from receiver.delivery.dispatcher import Dispatcher
from receiver.delivery.sender import AiohttpSender
from receiver.delivery.urlguard import UrlGuard
from receiver.errors import EXCEPTION_HANDLERS, StoreError
from receiver.jobs import JobRunner
from receiver.logs import configure_logging, get_logger, redact_path
from receiver.metrics import Metrics
from receiver.mirror import MIRROR, Mirror
from receiver.providers import Providers, signatures_for
from receiver.quotas import Quotas
from receiver.routes import assets, callbacks, deliveries, ops, streams, subscriptions, tasks, ui
from receiver.signing import AssetSigner, CallbackSigner
from receiver.store import Store, create_store
from receiver.types import Clock
from receiver.workers import Workers, expire_due_tasks

log = get_logger("receiver.access")


class AccessLog:
    """One redacted log line per request (uvicorn's own would print callback tokens), and the
    answer to a request the server's graceful shutdown cut off (`_cut_off`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not log.enabled():
            try:
                await self.app(scope, receive, send)
            except asyncio.CancelledError:
                if not await _cut_off(scope, send):
                    raise
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except asyncio.CancelledError:
            if not await _cut_off(scope, send_wrapper):
                raise
        finally:
            client = scope.get("client")
            log.info(
                "http.request",
                method=scope["method"],
                path=redact_path(scope["path"]),
                status=status,
                ms=round((time.perf_counter() - started) * 1000, 2),
                # After uvicorn's proxy headers (RECEIVER_FORWARDED_ALLOW_IPS): behind a tunnel, the
                # provider's address and https rather than the tunnel's 127.0.0.1 and http.
                client=client[0] if client else None,
                scheme=scope.get("scheme"),
            )


_CUT_OFF = orjson.dumps(
    {
        "error": {
            "code": "shutting_down",
            "message": "The receiver stopped before it finished this request; send it again.",
        }
    }
)


async def _cut_off(scope: Scope, send: Send) -> bool:
    """A request still unanswered when the graceful shutdown ran out (a callback whose body was
    still arriving, say), which uvicorn then cancels, is answered `503 shutting_down` in the
    contract's error shape rather than with uvicorn's plain-text 500 and a traceback. Whatever it
    did is safe to send again (a callback is recognised as a duplicate). False: not the server
    stopping, or the answer had already begun."""
    state = getattr(scope.get("app"), "state", None)
    draining = getattr(state, "draining", None)
    if not (isinstance(draining, asyncio.Event) and draining.is_set()):
        return False
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(_CUT_OFF)).encode()),
        (b"retry-after", b"5"),
        (b"connection", b"close"),
    ]
    try:
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": _CUT_OFF})
    except Exception:  # the answer had begun (or the connection is gone): nothing more to say
        return False
    log.warning("http.cut_off_by_shutdown", method=scope["method"], path=redact_path(scope["path"]))
    return True


def create_app(
    settings: Settings | None = None,
    *,
    store: Store | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Clock | None = None,
) -> Starlette:
    """Build the receiver. Missing secrets are filled from (or generated into) the data folder."""
    settings = ensure_secrets(settings or Settings.from_env(os.environ))
    clock = clock or system_clock
    api_keys = ApiKeys([str(key) for key in settings.api_keys])
    keys = [str(k) for k in settings.secret_keys]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        the_store = store or create_store(settings.database_url, clock=clock)
        try:
            await the_store.open()
        except StoreError as exc:  # one plain line before the server's own account of the failed start
            log.error("receiver.database_unavailable", error=str(exc)[:300], advice="check RECEIVER_DATABASE_URL")
            raise
        try:
            async with httpx.AsyncClient(
                transport=transport,
                headers={"user-agent": f"receiver/{__version__}"},
                follow_redirects=False,
            ) as http:
                ctx = Context(
                    settings=settings,
                    store=the_store,
                    clock=clock,
                    http=http,
                    providers=Providers(settings, http),
                    signer=CallbackSigner(keys, clock=clock),
                    metrics=Metrics(),
                    signatures=signatures_for(settings, http, clock),
                    assets=AssetStore(settings.asset_dir, AssetSigner(keys, clock=clock), settings.public_url),
                    url_guard=UrlGuard(allow_private=settings.allow_private_urls),
                )
                app.state.ctx = ctx
                app.state.draining = asyncio.Event()  # set when the server stops: SSE streams end
                app.state.quotas = Quotas(settings)  # long-polls and streams open per API key
                sender = AiohttpSender(guard=None if settings.allow_private_urls else ctx.url_guard)
                dispatcher = app.state.dispatcher = Dispatcher(ctx, sender)
                dispatcher.start()
                workers = Workers(the_store.feed)
                workers.add("expiry", lambda: expire_due_tasks(ctx), topic="expiry", idle=5.0)
                # Polls, and calls to synchronous providers (one job kind per provider).
                calls = {name: sync_calls.call_once for name in ctx.providers.names() if ctx.providers.sync(name)}
                mirror = Mirror(settings, ctx.url_guard)  # keeps succeeded tasks' images (receiver.mirror)
                jobs = JobRunner(ctx, {polling.KIND: polling.poll_once, MIRROR: mirror.run, **calls})
                ctx.metrics.expect_job_kinds(jobs.handlers)
                ctx.metrics.expect_providers(ctx.providers.names())
                workers.add("jobs", jobs.step, topic="jobs", idle=1.0)
                workers.add("deliveries", dispatcher.step, topic="deliveries", idle=30.0)
                await workers.start()
                log.info("receiver.started", version=__version__, database=the_store.__class__.__name__)
                if getattr(app.state, "settles_collector", False):  # `receiver serve` (each worker too)
                    settle_collector()  # after start-up: the store, sessions and workers are frozen too
                try:
                    yield
                finally:
                    app.state.draining.set()
                    await workers.stop()
                    await jobs.stop()
                    await mirror.aclose()
                    # Sends in flight may end within what is left of the server's graceful shutdown
                    # (receiver.server.begin_draining); the rest go back to the outbox.
                    stop_by = getattr(app.state, "stop_by", None)
                    now = asyncio.get_running_loop().time()
                    await dispatcher.close(grace=settings.shutdown_timeout if stop_by is None else stop_by - now)
                    await sender.aclose()
        finally:
            await the_store.close()

    app = Starlette(
        routes=[
            *callbacks.routes,  # first: the route every provider hits, matched before any other
            Mount(
                "/v1",
                routes=[*tasks.routes, *streams.routes, *subscriptions.routes, *deliveries.routes],
                middleware=[Middleware(BearerAuth, keys=api_keys)],
            ),
            *assets.routes,
            *ops.routes,
            *ui.routes,
        ],
        middleware=[Middleware(AccessLog)],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.state.settings = settings  # receiver.server serves it with these limits (receiver.protocol)
    return app


def app_from_env() -> Starlette:
    """The factory each worker process of `receiver serve --workers N` calls."""
    settings = Settings.from_env(os.environ)
    configure_logging(settings.log_level)
    app = create_app(settings)
    app.state.settles_collector = True  # a serving process (receiver.collector)
    return app
