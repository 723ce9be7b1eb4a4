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

A download goes through the same URL guard as deliveries, with the sender's
guarded resolver (every connect, every redirect's hop;
`RECEIVER_ALLOW_PRIVATE_URLS=1` turns it off), ignores proxies from the
environment, follows at most MAX_REDIRECTS redirects, must
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

import aiohttp
import yarl

from receiver import __version__
from receiver.assets import AssetStore, sniff
from receiver.config import Settings
from receiver.context import Context
from receiver.delivery.sender import guard_refusal, guarded_session
from receiver.delivery.urlguard import UrlGuard, literal_address
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
#: Of those, at most so many for one task: a task of slow images cannot hold back every other
#: task's `task.succeeded` (which waits for its images).
DOWNLOADS_PER_TASK = 2
#: Status codes worth trying again later.
_PASSING = frozenset({408, 425, 429, 500, 502, 503, 504})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


def marked(settings: Settings, report: Report) -> Report:
    """`report`, marked so that its success is held back until its images are kept (when mirroring is on)."""
    if settings.mirror_assets and report.state is TaskState.SUCCEEDED and not report.mirror:
        return report.replace(mirror=True)
    return report


class Downloader:
    """Fetches one image, within the limits (see the module docstring); raises AssetUnavailable.

    downloader = Downloader(UrlGuard(), max_bytes=50 << 20, timeout=60)
    data = await downloader.fetch("https://cdn.example/a.png")

    The session is built like the delivery sender's (`guarded_session`): connections go through
    the guarded resolver (every address a name resolves to is checked, and the connection goes
    to a checked one); an address written in a URL, which aiohttp connects to without
    resolving, is checked before each request. Redirects
    are followed here, hop by hop, so that every hop's URL gets the same checks.
    """

    def __init__(self, guard: UrlGuard, *, max_bytes: int, timeout: float) -> None:
        self.guard = guard
        self.max_bytes = max_bytes
        self.timeout = timeout
        self._slots = asyncio.Semaphore(CONCURRENT_DOWNLOADS)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Built on first use: a session belongs to the running event loop.
        if self._session is None:
            self._session = guarded_session(
                None if self.guard.allow_private else self.guard,
                limit=CONCURRENT_DOWNLOADS * 4,
                headers={"user-agent": f"receiver/{__version__}", "accept": "image/*"},
            )
        return self._session

    async def fetch(self, url: str) -> bytes:
        try:
            async with self._slots, asyncio.timeout(self.timeout):
                for _ in range(MAX_REDIRECTS + 1):
                    await self._check(url)
                    async with self._client().get(url, allow_redirects=False) as response:
                        if response.status not in _REDIRECTS:
                            return await self._read(response)
                        location = response.headers.get("location")
                        if not location:
                            raise AssetUnavailable("download_failed", f"HTTP {response.status} without a Location")
                        url = str(response.url.join(yarl.URL(location)))
                raise AssetUnavailable("download_failed", f"more than {MAX_REDIRECTS} redirects")
        except TimeoutError as exc:
            message = f"no complete answer within {self.timeout:g}s"
            raise AssetUnavailable("download_failed", message, retryable=True) from exc
        except UrlNotAllowed as exc:  # the URL, a redirect's, or an address a name resolved to
            raise AssetUnavailable("url_not_allowed", exc.message) from exc
        except aiohttp.ClientConnectorError as exc:
            refused = guard_refusal(exc)
            if refused is not None:
                raise AssetUnavailable("url_not_allowed", refused.message) from exc
            cause = exc.__cause__ or exc.os_error
            raise AssetUnavailable(
                "download_failed", f"connection failed: {cause or exc}"[:300], retryable=True
            ) from exc
        except (aiohttp.ClientError, ValueError, OSError) as exc:
            message = f"{type(exc).__name__}: {exc}"[:300]
            raise AssetUnavailable("download_failed", message, retryable=True) from exc

    async def _check(self, url: str) -> None:
        """http(s) with a host (always); a literal address must pass the guard (unless it is off)."""
        parsed = self.guard.parse(url, field="url")  # UrlNotAllowed
        host = parsed.host
        if not self.guard.allow_private and literal_address(host) is not None:
            await self.guard.addresses(host, parsed.port or 0)

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        status = response.status
        if status != 200:
            raise AssetUnavailable("download_failed", f"HTTP {status}", retryable=status in _PASSING)
        declared = response.headers.get("content-type", "").partition(";")[0].strip().lower()
        if not declared.startswith("image/"):
            raise AssetUnavailable("not_an_image", f"the answer is {declared or 'untyped'}, not image/*")
        if response.content_length is not None and response.content_length > self.max_bytes:
            raise self._too_large()
        data = bytearray()
        async for chunk in response.content.iter_chunked(1 << 16):
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
        if self._session is not None:
            await self._session.close()
            self._session = None


class Mirror:
    """The `mirror` job's handler: download, store, then announce (see the module docstring)."""

    def __init__(self, settings: Settings, guard: UrlGuard, *, retry_delays: Sequence[float] = RETRY_DELAYS) -> None:
        self.downloader = Downloader(guard, max_bytes=settings.mirror_max_bytes, timeout=settings.mirror_timeout)
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
        turns = asyncio.Semaphore(DOWNLOADS_PER_TASK)

        async def keep(url: str) -> str | AssetUnavailable:
            async with turns:
                return await self._keep(ctx.assets, url)

        answers = await asyncio.gather(*(keep(images[i]["url"]) for i in todo))
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
        try:
            return assets.url(await assets.put(data))
        except OSError as exc:  # the disk, not the image: tried again on the schedule, then given up
            log.error("mirror.store_failed", error=repr(exc)[:200])
            return AssetUnavailable("asset_store_failed", f"the image could not be written: {exc}", retryable=True)

    async def aclose(self) -> None:
        await self.downloader.aclose()
