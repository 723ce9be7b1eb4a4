"""Sends what the outbox holds to the subscribers.

    dispatcher = Dispatcher(ctx, HttpxSender(guard=ctx.url_guard))
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
Endpoints that may take nothing more right now are left out of the claim, so
their deliveries stay in the outbox untouched — no attempt is spent on them.

Ordering is the store's: the claim never hands out an event of a subscription
and task while an earlier one is pending, so when one succeeds or runs out of
attempts, the next goes at once.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import socket
from dataclasses import dataclass

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

    @property
    def in_flight(self) -> int:
        return len(self._sends)

    def breaker(self, subscription_id: str) -> Breaker | None:
        endpoint = self._endpoints.get(subscription_id)
        return endpoint.breaker if endpoint else None

    async def step(self) -> float | None:
        """Start every due delivery there is room for; returns seconds until more is due."""
        store = self.ctx.store
        free = self.max_in_flight - len(self._sends)
        if free <= 0:
            return None  # a send that ends wakes the worker
        now = self.ctx.clock()
        limit = min(self.batch, free)
        jobs = await store.claim_deliveries(
            now=now,
            limit=limit,
            owner=self.owner,
            lease_seconds=self.lease_seconds,
            exclude_subscriptions=self._full(now),
        )
        surplus = []
        for job in jobs:
            endpoint = self._endpoint(job.subscription.id)
            if endpoint.in_flight >= self._capacity(endpoint, now):
                surplus.append(job.delivery.id)  # more than the endpoint may take now
                continue
            endpoint.in_flight += 1
            send = asyncio.create_task(self._deliver(job, endpoint), name=f"receiver-delivery-{job.delivery.id}")
            self._sends.add(send)
            send.add_done_callback(self._sends.discard)
        if surplus:
            await store.release_deliveries(surplus, self.owner)
        if len(jobs) == limit:
            return 0.0  # there may be more
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

    async def close(self) -> None:
        """Cancel the sends in flight and hand every lease back (they go again later, same webhook-id)."""
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
            # The request is over: its slot may take the next one while the attempt is written.
            sending = False
            endpoint.in_flight -= 1
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
            if endpoint.in_flight == 0 and endpoint.breaker.idle and self._endpoints.get(subscription.id) is endpoint:
                del self._endpoints[subscription.id]
            self.ctx.store.feed.wake("deliveries")

    async def _send(self, job: DeliveryJob, now: float) -> Answer:
        subscription = job.subscription
        if subscription.uses_notify_secret:
            notify = self.ctx.settings.notify_secret
            keys: tuple[str, ...] = (str(notify),) if notify is not None else ()
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
        """Endpoints that may take no more requests now (at their limit, or paused)."""
        return [sid for sid, endpoint in self._endpoints.items() if endpoint.in_flight >= self._capacity(endpoint, now)]

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
