"""Keeping a succeeded task's images before their links expire (RECEIVER_MIRROR_ASSETS).

    report = marked(settings, report)          # before a success is recorded
    mirror = Mirror(settings, guard)           # built by the app's lifespan
    jobs = JobRunner(ctx, {MIRROR: mirror.run, …})
    await mirror.aclose()

Providers hand out image URLs that expire (seed 000: "download generated
assets promptly"). A success marked here is stored `succeeded` at once, with
`result.mirror: "pending"`, no event, and a `mirror` job — all in the
transaction that records it (`tasks.apply_report`). The job downloads each
image into the asset store (receiver.assets) and ends with one transition
(`tasks.keep_images`) that gives every image its `asset_url` (or an
`asset_error` saying why it could not be kept) and emits the `task.succeeded`
held back, so subscribers get links that do not expire under them.

A download goes through the same URL guard as deliveries (every connect,
redirects included; `RECEIVER_ALLOW_PRIVATE_URLS=1` turns it off), ignores
proxies from the environment, follows at most MAX_REDIRECTS redirects, must
answer 200 with an `image/*` type and bytes that are an image the receiver
knows (PNG, JPEG, WebP, GIF, AVIF — never SVG, which can carry scripts), at
most RECEIVER_MIRROR_MAX_BYTES, within RECEIVER_MIRROR_TIMEOUT. Failures that
may pass (timeouts, refused connections, 5xx, 429) are tried again after
RETRY_DELAYS; the others are final at once. The job's row is the schedule, so
a restart resumes it; a job that runs twice (a lease that ran out) finds the
task no longer pending and sends nothing twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from functools import partial

import httpx

from receiver import __version__
from receiver.assets import AssetStore, sniff
from receiver.config import Settings
from receiver.context import Context
from receiver.delivery.sender import GuardedTransport
from receiver.delivery.urlguard import UrlGuard
from receiver.errors import AssetUnavailable, UrlNotAllowed
from receiver.jobs import DONE, Outcome, again
from receiver.logs import get_logger
from receiver.store.base import Job
from receiver.tasks import MIRROR, Report, keep_images, wants_mirroring
from receiver.types import JSON, TaskState

__all__ = ["MAX_REDIRECTS", "MIRROR", "RETRY_DELAYS", "Downloader", "Mirror", "marked"]

log = get_logger("receiver.mirror")

#: Seconds before each retry of the downloads that failed for a passing reason (then: final).
RETRY_DELAYS = (2.0, 10.0, 30.0)
MAX_REDIRECTS = 3
#: Downloads at once per process: each holds up to RECEIVER_MIRROR_MAX_BYTES in memory.
CONCURRENT_DOWNLOADS = 4
#: Status codes worth trying again later.
_PASSING = frozenset({408, 425, 429, 500, 502, 503, 504})


def marked(settings: Settings, report: Report) -> Report:
    """`report`, marked so that its success is held back until its images are kept (when mirroring is on)."""
    if settings.mirror_assets and report.state is TaskState.SUCCEEDED and not report.mirror:
        return report.replace(mirror=True)
    return report


class Downloader:
    """Fetches one image, within the limits (see the module docstring); raises AssetUnavailable.

    downloader = Downloader(UrlGuard(), max_bytes=50 << 20, timeout=60)
    data = await downloader.fetch("https://cdn.example/a.png")
    """

    def __init__(
        self,
        guard: UrlGuard,
        *,
        max_bytes: int,
        timeout: float,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.guard = guard
        self.max_bytes = max_bytes
        self.timeout = timeout
        self._slots = asyncio.Semaphore(CONCURRENT_DOWNLOADS)
        if transport is None:
            limits = httpx.Limits(max_connections=64, max_keepalive_connections=16, keepalive_expiry=30)
            transport = (
                httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
                if guard.allow_private
                else GuardedTransport(guard, limits=limits)
            )
        self._client = httpx.AsyncClient(
            transport=transport,
            follow_redirects=True,
            max_redirects=MAX_REDIRECTS,
            trust_env=False,
            headers={"user-agent": f"receiver/{__version__}", "accept": "image/*"},
        )

    async def fetch(self, url: str) -> bytes:
        try:
            self.guard.parse(url, field="url")
        except UrlNotAllowed as exc:
            raise AssetUnavailable("url_not_allowed", exc.message) from exc
        try:
            async with (
                self._slots,
                asyncio.timeout(self.timeout),
                self._client.stream("GET", url, timeout=self.timeout) as response,
            ):
                return await self._read(response)
        except (TimeoutError, httpx.TimeoutException) as exc:
            message = f"no complete answer within {self.timeout:g}s"
            raise AssetUnavailable("download_failed", message, retryable=True) from exc
        except UrlNotAllowed as exc:  # a connect the guard refused (a redirect's too)
            raise AssetUnavailable("url_not_allowed", exc.message) from exc
        except httpx.TooManyRedirects as exc:
            raise AssetUnavailable("download_failed", f"more than {MAX_REDIRECTS} redirects") from exc
        except httpx.UnsupportedProtocol as exc:
            raise AssetUnavailable("url_not_allowed", f"a redirect left http(s): {exc}") from exc
        except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
            message = f"{type(exc).__name__}: {exc}"[:300]
            raise AssetUnavailable("download_failed", message, retryable=True) from exc

    async def _read(self, response: httpx.Response) -> bytes:
        status = response.status_code
        if status != 200:
            raise AssetUnavailable("download_failed", f"HTTP {status}", retryable=status in _PASSING)
        declared = response.headers.get("content-type", "").partition(";")[0].strip().lower()
        if not declared.startswith("image/"):
            raise AssetUnavailable("not_an_image", f"the answer is {declared or 'untyped'}, not image/*")
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            raise self._too_large()
        data = bytearray()
        async for chunk in response.aiter_bytes():
            data += chunk
            if len(data) > self.max_bytes:
                raise self._too_large()
        if sniff(bytes(data[:16])) is None:
            raise AssetUnavailable(
                "not_an_image",
                f"declared {declared}, but its bytes are not an image the receiver keeps (png, jpeg, webp, gif, avif)",
            )
        return bytes(data)

    def _too_large(self) -> AssetUnavailable:
        return AssetUnavailable("asset_too_large", f"larger than {self.max_bytes} bytes (RECEIVER_MIRROR_MAX_BYTES)")

    async def aclose(self) -> None:
        await self._client.aclose()


class Mirror:
    """The `mirror` job's handler: download, store, then announce (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        guard: UrlGuard,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        retry_delays: Sequence[float] = RETRY_DELAYS,
    ) -> None:
        self.downloader = Downloader(
            guard, max_bytes=settings.mirror_max_bytes, timeout=settings.mirror_timeout, transport=transport
        )
        self.retry_delays = tuple(retry_delays)

    async def run(self, ctx: Context, job: Job) -> Outcome:
        task = await ctx.store.get_task(job.task_id)
        if task is None or not task.mirroring or task.result is None:
            return DONE
        images: list[JSON] = list(task.result.get("images", []))
        # From earlier runs of this job: image index -> asset URL, or the error that is final.
        kept: dict[str, str] = dict(job.payload.get("kept", {}))
        refused: dict[str, JSON] = dict(job.payload.get("refused", {}))
        todo = [i for i, image in enumerate(images) if wants_mirroring(image) and str(i) not in kept | refused]
        answers = await asyncio.gather(*(self._keep(ctx.assets, images[i]["url"]) for i in todo))
        passing = 0
        for i, answer in zip(todo, answers, strict=True):
            if not isinstance(answer, AssetUnavailable):
                kept[str(i)] = answer
            elif answer.retryable and job.attempts < len(self.retry_delays):
                passing += 1  # tried again later
            else:
                refused[str(i)] = answer.as_error()
        if passing:
            delay = self.retry_delays[job.attempts]
            log.info("mirror.retry", task_id=task.id, failed=passing, attempt=job.attempts + 1, retry_in=delay)
            return again(ctx.clock() + delay, {**job.payload, "kept": kept, "refused": refused})
        final = []
        for i, image in enumerate(images):
            if str(i) in kept:
                final.append({**image, "asset_url": kept[str(i)]})
            elif str(i) in refused:
                final.append({**image, "asset_url": None, "asset_error": refused[str(i)]})
            else:
                final.append(image)
        applied = await ctx.store.transition(task.id, partial(keep_images, images=tuple(final), now=ctx.clock()))
        log.info(
            "mirror.done",
            task_id=task.id,
            kept=len(kept),
            failed=[f"{i}:{error.get('code')}" for i, error in refused.items()],
            announced=applied.transition.changed,
        )
        return DONE

    async def _keep(self, assets: AssetStore, url: str) -> str | AssetUnavailable:
        """The asset URL of the image at `url`, or why it could not be kept."""
        try:
            data = await self.downloader.fetch(url)
        except AssetUnavailable as exc:
            return exc
        return assets.url(await assets.put(data))

    async def aclose(self) -> None:
        await self.downloader.aclose()
