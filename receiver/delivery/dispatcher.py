"""Sends what the outbox holds to the subscribers.

    dispatcher = Dispatcher(ctx, AiohttpSender(guard=ctx.url_guard))
    workers.add("deliveries", dispatcher.step, topic="deliveries", idle=30.0)
    ...
    await workers.stop(); await dispatcher.close()   # cancels sends, hands the leases back

Each step claims what is due (a lease, so instances sharing a database never
send one delivery twice at once), starts one task per delivery and returns
without waiting for any of them: a subscriber that takes its whole timeout to
fail cannot hold up the others. The step sleeps until the next delivery is
due; a commit that writes deliveries, and every attempt that ends, wakes it.

Per endpoint (subscription) at most `delivery_concurrency` requests are in
flight, and a circuit breaker pauses an endpoint after consecutive failures.
Claimed deliveries wait in the endpoint's queue (at most two more rounds of
`delivery_concurrency`), so a request that ends starts the next one at once,
without another claim; endpoints whose queue is full, or that are paused, are
left out of the claim, so their deliveries stay in the outbox untouched — no
attempt is spent on them, and a paused endpoint's queue goes back at once.

Ordering is the store's: the claim never hands out an event of a subscription
and task while an earlier one is pending, so when one succeeds or runs out of
attempts, the next goes at once.

Fresh deliveries skip the claim: while the dispatcher takes offers (`start`),
a transaction that writes deliveries leases those first in line to it and
hands them over after commit (ChangeFeed.offer), so a callback's event is on
its way without a second database round trip. What an endpoint cannot take
goes back to the outbox at once; a dispatcher that dies leaves leases that
lapse, and any instance's claim picks the deliveries up.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import secrets
import socket
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from receiver.clock import isoformat
from receiver.context import Context
from receiver.delivery.breaker import Breaker, State
from receiver.delivery.schedule import RetrySchedule, parse_retry_after
from receiver.delivery.sender import Answer, Sender
from receiver.delivery.signing import webhook_headers
from receiver.logs import get_logger
from receiver.store.base import Attempt, AttemptOutcome, Delivery, DeliveryJob, Subscription
from receiver.types import DeliveryStatus

log = get_logger("receiver.deliveries")

#: Statuses whose Retry-After is honoured.
RETRY_AFTER_STATUSES = frozenset({429, 503})


def decide(
    delivery: Delivery,
    subscription: Subscription,
    answer: Answer,
    *,
    started: float,
    ended: float,
    schedule: RetrySchedule,
    disable_after: float,
) -> AttemptOutcome:
    """What one attempt means for its delivery and subscription (pure; the dispatcher writes it)."""
    attempt = Attempt(
        at=started,
        status_code=answer.status_code,
        latency_ms=answer.latency_ms,
        error=answer.error,
        response_body=answer.body,
    )
    if answer.ok:
        return AttemptOutcome(attempt, DeliveryStatus.SUCCEEDED)
    if answer.status_code == 410:
        return AttemptOutcome(attempt, DeliveryStatus.FAILED, disable="the endpoint answered 410 Gone")
    disable = None
    since = subscription.failing_since
    if since is not None and ended - since >= disable_after:
        disable = f"every delivery failed for {disable_after:g} seconds (since {isoformat(since)})"
    retry_after = None
    if answer.status_code in RETRY_AFTER_STATUSES:
        retry_after = parse_retry_after(answer.retry_after, now=ended)
    delay = schedule.delay_after(delivery.attempt_count + 1, retry_after=retry_after)
    if delay is None:
        return AttemptOutcome(attempt, DeliveryStatus.FAILED, disable=disable)
    return AttemptOutcome(attempt, DeliveryStatus.PENDING, next_attempt_at=ended + delay, disable=disable)


@dataclass
class _Endpoint:
    breaker: Breaker
    in_flight: int = 0
    queue: collections.deque[DeliveryJob] = field(default_factory=collections.deque)
    # Deliveries of this endpoint wait in the outbox: new ones join them there, in order,
    # rather than overtaking them straight from an offer.
    backlog: bool = False


class Dispatcher:
    def __init__(
        self,
        ctx: Context,
        sender: Sender,
        *,
        rng: random.Random | None = None,
        owner: str | None = None,
        batch: int = 100,
        max_in_flight: int = 512,
    ) -> None:
        self.ctx = ctx
        self.sender = sender
        self.schedule = RetrySchedule(ctx.settings.retry_schedule, rng=rng)
        self.owner = owner or f"deliveries:{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.batch = batch
        self.max_in_flight = max_in_flight
        # Long enough for one attempt and the write that ends it; a crashed instance's leases lapse after it.
        self.lease_seconds = ctx.settings.delivery_timeout * 2 + 5
        self._endpoints: dict[str, _Endpoint] = {}
        self._sends: set[asyncio.Task[None]] = set()
        self._chores: set[asyncio.Task[Any]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._sends)

    def start(self) -> None:
        """Take the deliveries this instance's transactions write, leased at once (see the module)."""
        self.ctx.store.feed.take_offers(self.owner, self.lease_seconds, self.accept, self.resend)

    def accept(self, jobs: Sequence[DeliveryJob]) -> None:
        """Deliveries leased to this dispatcher at creation: queue what endpoints may take, send."""
        now = self.ctx.clock()
        surplus = []
        held = len(self._sends) + self._queued()  # counted once: a pump only moves jobs from a queue to a send
        for job in jobs:
            endpoint = self._endpoint(job.subscription.id)
            busy = held >= self.max_in_flight
            full = self._capacity(endpoint, now) == 0 or len(endpoint.queue) >= self._room(endpoint, now)
            if busy or full or endpoint.backlog:
                endpoint.backlog = True
                surplus.append(job.delivery.id)
                continue
            endpoint.queue.append(job)
            held += 1
            self._pump(endpoint, now)
        if surplus:  # back to the outbox, for a claim when there is room
            self._background(self.ctx.store.release_deliveries(surplus, self.owner))

    def resend(self, job: DeliveryJob) -> None:
        """A delivery asked to be sent again (`POST /v1/deliveries/{id}/retry`), leased to this
        dispatcher: it goes now, past the endpoint's concurrency and even while the endpoint is
        paused, as its probe (a success resumes the endpoint; a failure keeps it paused)."""
        endpoint = self._endpoint(job.subscription.id)
        self._send_now(job, endpoint)

    def _background(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(work)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    def breaker(self, subscription_id: str) -> Breaker | None:
        endpoint = self._endpoints.get(subscription_id)
        return endpoint.breaker if endpoint else None

    async def step(self) -> float | None:
        """Claim what is due for endpoints with room, start what may go; returns seconds until
        more is due."""
        store = self.ctx.store
        now = self.ctx.clock()
        await self._hand_back_paused(now)
        free = self.max_in_flight - len(self._sends) - self._queued()
        if free > 0:
            limit = min(self.batch, free)
            excluded = self._full(now)
            per_subscription = self.ctx.settings.delivery_concurrency
            jobs = await store.claim_deliveries(
                now=now,
                limit=limit,
                owner=self.owner,
                lease_seconds=self.lease_seconds,
                exclude_subscriptions=excluded,
                per_subscription=per_subscription,
            )
            taken: collections.Counter[str] = collections.Counter()
            for job in jobs:
                self._endpoint(job.subscription.id).queue.append(job)
                taken[job.subscription.id] += 1
            # An endpoint's backlog is gone once a claim could take all it had due.
            for sid, endpoint in self._endpoints.items():
                if endpoint.backlog and sid not in excluded and taken[sid] < per_subscription:
                    endpoint.backlog = False
        else:
            jobs = []
        for endpoint in list(self._endpoints.values()):
            self._pump(endpoint, now)
        surplus = [
            job.delivery.id
            for e in self._endpoints.values()
            if len(e.queue) > self._room(e, now)
            for job in self._trim(e, now)
        ]
        if surplus:  # more than an endpoint may take in a while: back to the outbox
            await store.release_deliveries(surplus, self.owner)
        if free > 0 and len(jobs) == min(self.batch, free):
            return 0.0  # there may be more
        if self._sends:
            return None  # every send that ends wakes the worker: no need to ask the store when
        now = self.ctx.clock()
        moments = [
            endpoint.breaker.open_until
            for endpoint in self._endpoints.values()
            if endpoint.breaker.open_until is not None and endpoint.breaker.open_until > now
        ]
        due = await store.next_delivery_due(exclude_subscriptions=self._full(now))
        if due is not None:
            moments.append(due)
        return max(0.0, min(moments) - now) if moments else None

    def _pump(self, endpoint: _Endpoint, now: float) -> None:
        """Start the endpoint's queued deliveries while it has room."""
        while endpoint.queue and endpoint.in_flight < self._capacity(endpoint, now):
            self._send_now(endpoint.queue.popleft(), endpoint)

    def _send_now(self, job: DeliveryJob, endpoint: _Endpoint) -> None:
        endpoint.in_flight += 1
        send = asyncio.create_task(self._deliver(job, endpoint), name=f"receiver-delivery-{job.delivery.id}")
        self._sends.add(send)
        send.add_done_callback(self._sends.discard)

    def _room(self, endpoint: _Endpoint, now: float) -> int:
        """How many claimed deliveries an endpoint may hold waiting: two more rounds of its capacity."""
        return 2 * self._capacity(endpoint, now)

    def _trim(self, endpoint: _Endpoint, now: float) -> list[DeliveryJob]:
        trimmed = []
        while len(endpoint.queue) > self._room(endpoint, now):
            trimmed.append(endpoint.queue.pop())
        return trimmed

    def _queued(self) -> int:
        return sum(len(endpoint.queue) for endpoint in self._endpoints.values())

    async def _hand_back_paused(self, now: float) -> None:
        """A paused endpoint holds no claimed deliveries: they go back to the outbox untouched."""
        paused = [e for e in self._endpoints.values() if e.queue and self._capacity(e, now) == 0]
        released = [job.delivery.id for e in paused for job in e.queue]
        for endpoint in paused:
            endpoint.queue.clear()
        if released:
            await self.ctx.store.release_deliveries(released, self.owner)

    async def close(self, grace: float = 0.0) -> None:
        """Let the sends in flight end within `grace` seconds, cancel the rest, and hand every
        lease back (what was not sent goes again later, with the same webhook-id)."""
        self.ctx.store.feed.stop_taking_offers()
        await asyncio.gather(*self._chores, return_exceptions=True)
        for endpoint in self._endpoints.values():
            endpoint.queue.clear()
        if self._sends and grace > 0:
            await asyncio.wait(set(self._sends), timeout=grace)  # queues are empty: no new sends start
        for send in list(self._sends):
            send.cancel()
        await asyncio.gather(*self._sends, return_exceptions=True)
        released = await self.ctx.store.release_leases(self.owner)
        if released:
            log.info("deliveries.handed_back", count=released)

    # --- one delivery ---------------------------------------------------------------

    async def _deliver(self, job: DeliveryJob, endpoint: _Endpoint) -> None:
        delivery, subscription = job.delivery, job.subscription
        settings, metrics = self.ctx.settings, self.ctx.metrics
        sending = True
        try:
            started = self.ctx.clock()
            answer = await self._send(job, started)
            ended = self.ctx.clock()
            before = endpoint.breaker.state(ended)
            after = endpoint.breaker.record(ok=answer.ok, now=ended)
            # The request is over: its slot takes the next queued delivery while the attempt is written.
            sending = False
            endpoint.in_flight -= 1
            self._pump(endpoint, ended)
            if not endpoint.queue:
                self.ctx.store.feed.wake("deliveries")
            outcome = decide(
                delivery,
                subscription,
                answer,
                started=started,
                ended=ended,
                schedule=self.schedule,
                disable_after=settings.disable_after,
            )
            await self.ctx.store.finish_attempt(delivery.id, self.owner, outcome)
            metrics.delivery_latency.observe(answer.latency_ms / 1000)
            label = "retrying" if outcome.status is DeliveryStatus.PENDING else outcome.status.value
            metrics.deliveries.labels(label).inc()
            self._log(job, answer, outcome)
            if after is not before:
                self._log_breaker(subscription.id, before, after, endpoint.breaker)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the lease lapses and the delivery goes again
            log.error(
                "worker.failed", worker="deliveries", delivery_id=delivery.id, error=repr(exc)[:500], exc_info=True
            )
        finally:
            if sending:
                endpoint.in_flight -= 1
            # Forget an endpoint with nothing to remember (but never a newer one for the same subscription).
            if (
                endpoint.in_flight == 0
                and not endpoint.queue
                and not endpoint.backlog
                and endpoint.breaker.idle
                and self._endpoints.get(subscription.id) is endpoint
            ):
                del self._endpoints[subscription.id]
            self.ctx.store.feed.wake("deliveries")

    async def _send(self, job: DeliveryJob, now: float) -> Answer:
        subscription = job.subscription
        if subscription.uses_notify_secret:
            keys = self.ctx.settings.notify_secrets
        else:
            keys = subscription.signing_secrets(now)
        if not keys or not all(keys):
            return Answer(None, 0.0, error="no signing secret for this subscription")
        headers = webhook_headers(job.delivery.event_id, job.body, keys, now=now)
        return await self.sender.send(subscription.url, job.body, headers, timeout=self.ctx.settings.delivery_timeout)

    # --- endpoints ------------------------------------------------------------------

    def _endpoint(self, subscription_id: str) -> _Endpoint:
        endpoint = self._endpoints.get(subscription_id)
        if endpoint is None:
            settings = self.ctx.settings
            breaker = Breaker(threshold=settings.breaker_failures, cooldown=settings.breaker_cooldown)
            endpoint = self._endpoints[subscription_id] = _Endpoint(breaker)
        return endpoint

    def _capacity(self, endpoint: _Endpoint, now: float) -> int:
        return endpoint.breaker.capacity(now, limit=self.ctx.settings.delivery_concurrency)

    def _full(self, now: float) -> list[str]:
        """Endpoints that may be given nothing more now: paused, or with their queue full (`_room`)."""
        return [
            sid
            for sid, endpoint in self._endpoints.items()
            if self._capacity(endpoint, now) == 0 or len(endpoint.queue) >= self._room(endpoint, now)
        ]

    # --- logs -----------------------------------------------------------------------

    @staticmethod
    def _log(job: DeliveryJob, answer: Answer, outcome: AttemptOutcome) -> None:
        fields = {
            "delivery_id": job.delivery.id,
            "subscription_id": job.subscription.id,
            "event_id": job.delivery.event_id,
            "event_type": job.delivery.event_type,
            "task_id": job.delivery.task_id,
            "attempt": job.delivery.attempt_count + 1,
            "status_code": answer.status_code,
            "ms": round(answer.latency_ms, 2),
        }
        if outcome.status is DeliveryStatus.SUCCEEDED:
            log.debug("delivery.succeeded", **fields)
        elif outcome.status is DeliveryStatus.PENDING:
            due = isoformat(outcome.next_attempt_at)
            log.info("delivery.retrying", error=answer.error, next_attempt_at=due, **fields)
        else:
            log.warning("delivery.failed", error=answer.error, **fields)
        if outcome.disable:
            log.warning("subscription.disabled", subscription_id=job.subscription.id, reason=outcome.disable)

    @staticmethod
    def _log_breaker(subscription_id: str, before: State, after: State, breaker: Breaker) -> None:
        if after is State.OPEN:
            log.warning(
                "endpoint.paused",
                subscription_id=subscription_id,
                failures=breaker.failures,
                until=isoformat(breaker.open_until),
            )
        elif after is State.CLOSED:
            log.info("endpoint.resumed", subscription_id=subscription_id)
