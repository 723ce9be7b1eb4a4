"""Prometheus metrics, one registry per app (so tests can build many apps).

With `receiver serve --workers N` each worker process counts on its own; `receiver serve` then
points PROMETHEUS_MULTIPROC_DIR at a fresh folder (`shared_folder`), prometheus_client keeps
every worker's values there, and `/metrics`, whichever worker answers it, adds them up: counters
and histograms are the sums over the workers (those of a worker that was replaced included, so
they never go down), gauges (read from the database, the same in every worker) the latest value.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from receiver.errors import (
    CallbackExpired,
    InvalidPayload,
    InvalidProviderSignature,
    InvalidSignature,
    PayloadTooLarge,
    RequestTimeout,
    TaskMismatch,
)
from receiver.types import TaskState, Verdict

#: The outcomes `receiver_callbacks_total` counts: a verdict, or the code of a refusal (the
#: errors' own codes; a task that does not exist is NotFound's `task_not_found`).
CALLBACK_OUTCOMES = (
    *(verdict.value for verdict in Verdict),
    *(
        error.code
        for error in (
            InvalidPayload,
            InvalidSignature,
            InvalidProviderSignature,
            TaskMismatch,
            CallbackExpired,
            PayloadTooLarge,
            RequestTimeout,
        )
    ),
    "task_not_found",
)
DELIVERY_OUTCOMES = ("succeeded", "retrying", "failed")

#: prometheus_client's own switch: set, every metric keeps its value in a file in that folder.
MULTIPROCESS_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


@contextlib.contextmanager
def shared_folder() -> Iterator[str]:
    """A fresh folder for the values of the worker processes started inside (set in the
    environment they inherit), removed afterwards."""
    folder = tempfile.mkdtemp(prefix="receiver-metrics-")
    previous = os.environ.get(MULTIPROCESS_VARIABLE)
    os.environ[MULTIPROCESS_VARIABLE] = folder
    try:
        yield folder
    finally:
        if previous is None:
            os.environ.pop(MULTIPROCESS_VARIABLE, None)
        else:
            os.environ[MULTIPROCESS_VARIABLE] = previous
        shutil.rmtree(folder, ignore_errors=True)


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
        # Read from the database at each scrape: across worker processes, the latest value counts.
        self.tasks = Gauge(
            "receiver_tasks", "Tasks by state.", ["state"], registry=self.registry, multiprocess_mode="mostrecent"
        )
        self.outbox_depth = Gauge(
            "receiver_outbox_depth",
            "Deliveries waiting to be sent.",
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.poll_backlog = Gauge(
            "receiver_poll_backlog",
            "Background jobs waiting, by kind.",
            ["kind"],
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self._job_kinds: set[str] = set()
        # Every series an alert may watch exists from the start, at 0: `absent()` and `rate()` over
        # a restart need no special case.
        for outcome in CALLBACK_OUTCOMES:
            self.callbacks.labels(outcome)
        for outcome in DELIVERY_OUTCOMES:
            self.deliveries.labels(outcome)

    def expect_providers(self, providers: Iterable[str]) -> None:
        """Show these providers' submissions from the first scrape, at 0."""
        for provider in providers:
            for outcome in ("accepted", "refused"):
                self.submissions.labels(provider, outcome)

    def expect_job_kinds(self, kinds: Iterable[str]) -> None:
        """Show these job kinds' backlog from the first scrape, at 0 while nothing waits."""
        self._job_kinds |= set(kinds)

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
        self._job_kinds |= set(jobs)
        for kind in self._job_kinds:  # a kind with nothing left waiting is 0, not its last count
            self.poll_backlog.labels(kind).set(jobs.get(kind, 0))
        folder = os.environ.get(MULTIPROCESS_VARIABLE)
        if folder:
            every_worker = CollectorRegistry()
            MultiProcessCollector(every_worker, path=folder)  # type: ignore[no-untyped-call]
            return generate_latest(every_worker)
        return generate_latest(self.registry)
