"""Limits on what one client may hold or store.

    release = quotas(request).streams.take(key_id)      # 429 too_many_streams when full
    try: ... finally: release()

- `streams`: long-polls (`GET /v1/tasks/{id}?wait=`) and SSE streams
  (`/v1/tasks/{id}/events`, `/v1/stream`) open at once per API key
  (`RECEIVER_MAX_STREAMS_PER_KEY`), 429 `too_many_streams` with Retry-After
  beyond it; dashboard streams (`/v1/stream`) also hold one of
  `dashboard_streams`, a smaller cap (a few browser tabs). Counted per process: with `--workers N` each
  worker admits its own share.

(Callbacks kept per task, `RECEIVER_MAX_CALLBACKS_PER_TASK`, are bounded by the store in the
transaction that would keep one more: `receiver.store.outbox.logs_callback`.)
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.requests import Request

from receiver.config import Settings
from receiver.errors import TooManyRequests

#: Seconds a client refused for too many open streams is told to wait.
STREAM_RETRY_AFTER = 5


class Slots:
    """At most `limit` things held at once per key."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what
        self._held: dict[str, int] = {}

    def held(self, key: str | None = None) -> int:
        """Slots held by `key`, or by every key."""
        return self._held.get(key, 0) if key is not None else sum(self._held.values())

    def take(self, key: str) -> Callable[[], None]:
        """Hold one slot for `key`, or raise 429 `too_many_streams`; returns its (idempotent) release."""
        if self._held.get(key, 0) >= self.limit:
            raise TooManyRequests(
                f"At most {self.limit} {self.what} may be open at once with one API key; close one first.",
                code="too_many_streams",
                retry_after=STREAM_RETRY_AFTER,
                details={"limit": self.limit},
            )
        self._held[key] = self._held.get(key, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self._held[key] -= 1
            if not self._held[key]:
                del self._held[key]

        return release


#: Dashboard streams (`GET /v1/stream`) open at once per API key: a few browser tabs.
DASHBOARD_STREAMS_PER_KEY = 8


class Quotas:
    """The per-process limits of one app (kept at `app.state.quotas`)."""

    def __init__(self, settings: Settings) -> None:
        self.streams = Slots(settings.max_streams_per_key, "long-polls and event streams")
        self.dashboard_streams = Slots(DASHBOARD_STREAMS_PER_KEY, "dashboard streams")


def quotas(request: Request) -> Quotas:
    found: Quotas | None = getattr(request.app.state, "quotas", None)
    if found is None:  # an app whose lifespan has not run (a bare test app): its settings, if any
        found = request.app.state.quotas = Quotas(getattr(request.app.state, "settings", None) or Settings())
    return found
