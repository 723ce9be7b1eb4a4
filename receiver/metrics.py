"""Prometheus metrics, one registry per app (so tests can build many apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from receiver.types import TaskState


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.callbacks = Counter(
            "receiver_callbacks_total",
            "Callbacks received, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.submissions = Counter(
            "receiver_submissions_total",
            "Tasks submitted upstream, by provider and outcome.",
            ["provider", "outcome"],
            registry=self.registry,
        )
        self.deliveries = Counter(
            "receiver_deliveries_total",
            "Delivery attempts to subscribers, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.delivery_latency = Histogram(
            "receiver_delivery_latency_seconds",
            "Time a subscriber took to answer one delivery attempt.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.tasks = Gauge("receiver_tasks", "Tasks by state.", ["state"], registry=self.registry)
        self.outbox_depth = Gauge("receiver_outbox_depth", "Deliveries waiting to be sent.", registry=self.registry)
        self.poll_backlog = Gauge(
            "receiver_poll_backlog", "Background jobs waiting, by kind.", ["kind"], registry=self.registry
        )

    def render(self, counts: dict[str, object]) -> bytes:
        """The exposition text, with the gauges refreshed from `counts` (Store.counts())."""
        tasks = counts.get("tasks", {})
        assert isinstance(tasks, dict)
        for state in TaskState:
            self.tasks.labels(state.value).set(tasks.get(state.value, 0))
        pending = counts.get("pending_deliveries", 0)
        assert isinstance(pending, int)
        self.outbox_depth.set(pending)
        jobs = counts.get("jobs", {})
        assert isinstance(jobs, dict)
        for kind, n in jobs.items():
            self.poll_backlog.labels(kind).set(n)
        return generate_latest(self.registry)
