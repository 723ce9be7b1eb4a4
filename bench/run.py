"""Benchmarks of the receiver against a bare Starlette baseline measured in the same run.

    bench/run                      # everything (about 4 minutes)
    bench/run --only ingest        # one scenario; --quick for a short smoke run

Every server runs on 127.0.0.1 in its own process; every load is bounded in
time; the figures are printed as a table, each headline figure beside the
latest earlier run's, and written to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench import loadgen  # noqa: E402
from bench.seed import BODY, SIGNING_KEY, drop_postgres_schema, seed_postgres, seed_sqlite  # noqa: E402
from receiver.server import free_port  # noqa: E402

# --- servers ------------------------------------------------------------------------


class Server:
    """A server process on 127.0.0.1 whose memory is sampled while it runs."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int, log: Path) -> None:
        self.name, self.argv, self.env, self.port, self.log = name, argv, env, port, log
        self.start_timeout = 30.0  # seconds; a server under valgrind takes longer
        self.process: subprocess.Popen[bytes] | None = None
        self.samples: list[tuple[float, int]] = []  # (time, rss bytes)
        self._sampling = False

    def start(self) -> None:
        with self.log.open("ab") as handle:
            self.process = subprocess.Popen(self.argv, env=self.env, stdout=handle, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()[-3000:]}")
            try:
                httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def rss(self) -> int:
        """Memory of the server and every process it started (the SQLite writer and its helper):
        the sum of their proportional set sizes, so pages they share are counted once."""
        return sum(_pss_kb(pid) for pid in self._tree()) * 1024

    def peak_rss(self) -> int:
        """The largest `rss()` sampled while `sampling()` ran (or now)."""
        return max([rss for _, rss in self.samples] or [self.rss()])

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) used so far by the server's request loop ("loop") and by the
        SQLite writer processes it started ("writer"; absent for other servers)."""
        used: dict[str, float] = {}
        for pid in self._tree():
            part = "loop" if pid == self.process.pid else _role(pid)  # type: ignore[union-attr]
            if part is not None:
                used[part] = used.get(part, 0.0) + _cpu_seconds(pid)
        return used

    def _tree(self) -> list[int]:
        assert self.process is not None
        found, todo = [], [self.process.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            for task in Path(f"/proc/{pid}/task").glob("*"):
                with contextlib.suppress(OSError):
                    todo.extend(int(child) for child in (task / "children").read_text().split())
        return found

    @contextmanager
    def sampling(self, every: float = 0.25) -> Iterator[None]:
        self._sampling = True

        def sample() -> None:
            while self._sampling:
                try:
                    self.samples.append((time.monotonic(), self.rss()))
                except (OSError, AttributeError):
                    return
                time.sleep(every)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._sampling = False
            thread.join()


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _role(pid: int) -> str | None:
    with contextlib.suppress(OSError):
        if b"receiver.store.writer" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return "writer"
    return None


@contextmanager
def cpu_per_request(server: Server, into: dict[str, float]) -> Iterator[None]:
    """Fills `into` with the server's CPU seconds per part used while the block ran (divide by
    the requests served for the CPU each cost)."""
    before = server.cpu_seconds()
    yield
    after = server.cpu_seconds()
    into.update({part: after[part] - before.get(part, 0.0) for part in after})


def _pss_kb(pid: int) -> int:
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    found = re.search(r"^Pss:\s+(\d+) kB", rollup, re.M)
    return int(found.group(1)) if found else 0


@contextmanager
def running(server: Server) -> Iterator[Server]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


def baseline_server(work: Path) -> Server:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "bench.baseline:app",
        "--app-dir",
        str(HERE.parent),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    return Server("baseline", argv, dict(os.environ), port, work / "baseline.log")


def receiver_server(work: Path, database_url: str, **env: str) -> Server:
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RECEIVER_")}
    environment.update(
        {
            "RECEIVER_DATABASE_URL": database_url,
            "RECEIVER_DATA_DIR": str(work),
            "RECEIVER_PUBLIC_URL": f"http://127.0.0.1:{port}",
            "RECEIVER_SECRET_KEY": SIGNING_KEY,
            "RECEIVER_API_KEYS": "bench-api-key",
            "RECEIVER_NOTIFY_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "RECEIVER_LOG_LEVEL": "warning",
            "RECEIVER_MIRROR_ASSETS": "0",
            "RECEIVER_ALLOW_PRIVATE_URLS": "1",
            **env,
        }
    )
    argv = [sys.executable, "-m", "receiver", "serve", "--host", "127.0.0.1", "--port", str(port)]
    return Server("receiver", argv, environment, port, work / "receiver.log")


# --- load ---------------------------------------------------------------------------


@dataclass
class Load:
    requests: int
    seconds: float
    ok: int
    errors: int
    p50_ms: float
    p99_ms: float
    tool: str

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    number, unit = re.match(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


@dataclass
class Urls:
    """Signed callback paths, one task each, handed out so no two runs post to the same task."""

    path: Path
    count: int
    cursor: int = 0

    def advance(self, used: int, margin: int) -> None:
        self.cursor += used + margin

    @property
    def exhausted(self) -> bool:
        return self.cursor >= self.count


def wrk(port: int, urls: Urls, *, connections: int, duration: float, threads: int = 2) -> Load:
    env = {
        **os.environ,
        "BENCH_URLS": str(urls.path),
        "BENCH_START": str(urls.cursor),
        "BENCH_BODY": BODY.decode(),
        "BENCH_THREADS": str(threads),
    }
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{duration:g}s",
            "--latency",
            "-s",
            str(HERE / "callbacks.lua"),
            f"http://127.0.0.1:{port}",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=duration + 60,
    ).stdout
    total = int(re.search(r"(\d+) requests in ([\d.]+)(\w+)", out).group(1))  # type: ignore[union-attr]
    seconds = _ms(re.search(r"requests in ([\d.]+\w+)", out).group(1)) / 1000  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    error_count = sum(int(g) for g in errors.groups()) if errors else 0
    bad = int(non_2xx.group(1)) if non_2xx else 0
    p50 = _ms(re.search(r"50%\s+([\d.]+\w+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"99%\s+([\d.]+\w+)", out).group(1))  # type: ignore[union-attr]
    return Load(total, seconds, total - bad, error_count + bad, p50, p99, "wrk")


def python_load(port: int, urls: Urls, *, connections: int, duration: float, total: int | None = None) -> Load:
    """The Python load generator: for `duration` seconds, or until `total` requests were sent."""
    paths = urls.path.read_text().split()
    counter = iter(range(urls.cursor, 10**12))

    def next_request() -> bytes:
        return loadgen.request_bytes("127.0.0.1", port, paths[next(counter) % len(paths)], BODY)

    result = asyncio.run(
        loadgen.closed_loop("127.0.0.1", port, next_request, connections=connections, duration=duration, total=total)
    )
    return Load(
        result.count,
        result.finished - result.started,
        result.ok(),
        result.errors,
        result.percentile(50) * 1000,
        result.percentile(99) * 1000,
        "python",
    )


def load(port: int, urls: Urls, *, connections: int, duration: float) -> Load:
    run = wrk if shutil.which("wrk") else python_load
    result = run(port, urls, connections=connections, duration=duration)
    urls.advance(result.requests, margin=connections)
    return result


# --- scenarios ----------------------------------------------------------------------


@dataclass
class Report:
    baseline_rps: float | None = None  # the bare endpoint, measured by the ingest scenario
    figures: dict[str, Any] = field(default_factory=dict)
    rows: list[tuple[str, ...]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(self, *cells: Any) -> None:
        self.rows.append(tuple(str(c) for c in cells))


def _us(seconds: float, requests: int) -> float:
    return round(seconds / requests * 1e6, 1) if requests else 0.0


def _mb(value: float) -> str:
    return f"{value / 2**20:.1f}"


def scenario_ingest(args: argparse.Namespace, work: Path, report: Report) -> None:
    """Callback ingest at 64 (and 256) connections, against the bare endpoint in the same run."""
    database = work / "ingest.db"
    print(f"  seeding {args.tasks} tasks …", flush=True)
    seed_sqlite(database, args.tasks, work / "urls.txt")
    urls = Urls(work / "urls.txt", args.tasks)

    base_cpu: dict[str, float] = {}
    cpu: dict[str, float] = {}
    # The bare endpoint runs before and after the receiver: this machine's speed moves over minutes
    # (bench/README.md), so the ratio is taken against the two runs together (rates and latencies
    # averaged) and each is reported.
    before = measure_baseline(args, work, urls, base_cpu)
    urls.cursor = 0  # the baseline stores nothing: the receiver may use every task
    with running(receiver_server(work, f"sqlite:///{database}")) as server, server.sampling():
        warmup = load(server.port, urls, connections=args.connections, duration=min(2.0, args.duration))
        with cpu_per_request(server, cpu):
            measured = load(server.port, urls, connections=args.connections, duration=args.duration)
        wide = load(server.port, urls, connections=256, duration=args.duration)
        peak = server.peak_rss()
    cursor, urls.cursor = urls.cursor, 0
    after = measure_baseline(args, work, urls, {})
    urls.cursor = cursor
    baseline = Load(
        before.requests + after.requests,
        before.seconds + after.seconds,
        before.ok + after.ok,
        before.errors + after.errors,
        (before.p50_ms + after.p50_ms) / 2,
        (before.p99_ms + after.p99_ms) / 2,
        before.tool,
    )
    drift = abs(before.rate - after.rate) / min(before.rate, after.rate)
    cpu_us = {
        "baseline": _us(base_cpu.get("loop", 0.0), before.requests),
        "receiver_loop": _us(cpu.get("loop", 0.0), measured.requests),
        "receiver_writer": _us(cpu.get("writer", 0.0), measured.requests),
    }
    # Every 2xx must be a stored row (rows may exceed: requests in flight when a run stopped).
    stored = _count(database, "SELECT count(*) FROM callbacks")
    acknowledged_total = warmup.ok + measured.ok + wide.ok
    ratio = measured.rate / baseline.rate
    report.baseline_rps = baseline.rate
    report.figures["ingest"] = {
        "baseline_rps": round(baseline.rate, 1),
        "baseline_rps_before": round(before.rate, 1),
        "baseline_rps_after": round(after.rate, 1),
        "baseline_p50_ms": baseline.p50_ms,
        "baseline_p99_ms": baseline.p99_ms,
        "receiver_rps": round(measured.rate, 1),
        "receiver_p50_ms": measured.p50_ms,
        "receiver_p99_ms": measured.p99_ms,
        "ratio": round(ratio, 3),
        "receiver_rps_256": round(wide.rate, 1),
        "receiver_p99_ms_256": wide.p99_ms,
        "errors": measured.errors + wide.errors,
        "peak_rss_mb": round(peak / 2**20, 1),
        "callbacks_stored": stored,
        "callbacks_acknowledged_measured": acknowledged_total,
        "tool": measured.tool,
        "cpu_us_per_request": cpu_us,
    }
    report.row(
        "ingest: bare Starlette endpoint",
        f"{baseline.rate:,.0f}",
        "1.00",
        f"{baseline.p50_ms:.1f}",
        f"{baseline.p99_ms:.1f}",
        "",
    )
    report.row(
        f"ingest: receiver, {args.connections} conns",
        f"{measured.rate:,.0f}",
        f"{ratio:.2f}",
        f"{measured.p50_ms:.1f}",
        f"{measured.p99_ms:.1f}",
        _mb(peak),
    )
    report.row(
        "ingest: receiver, 256 conns",
        f"{wide.rate:,.0f}",
        f"{wide.rate / baseline.rate:.2f}",
        f"{wide.p50_ms:.1f}",
        f"{wide.p99_ms:.1f}",
        "",
    )
    report.notes.append(
        f"CPU per callback at {args.connections} conns: bare endpoint {cpu_us['baseline']:.0f} µs; receiver"
        f" {cpu_us['receiver_loop']:.0f} µs (request loop) + {cpu_us['receiver_writer']:.0f} µs (SQLite writer)"
    )
    report.notes.append(
        f"bare endpoint {before.rate:,.0f} req/s before the receiver's runs and {after.rate:,.0f} after"
        + (f": the machine's speed moved {drift:.0%} meanwhile, so the ratio is that uncertain" if drift > 0.1 else "")
    )
    if urls.exhausted:
        report.notes.append(f"only {args.tasks} tasks were seeded: later callbacks repeated earlier ones (--tasks)")
    if stored < acknowledged_total:
        report.notes.append(f"DURABILITY VIOLATED: {acknowledged_total} callbacks answered 2xx but {stored} stored")
    else:
        report.notes.append(f"every acknowledged callback is stored ({stored} rows ≥ {acknowledged_total} 2xx)")
    if measured.tool != "wrk":
        report.notes.append("wrk is missing: the Python load generator was used; its own speed caps the figures")


def measure_baseline(args: argparse.Namespace, work: Path, urls: Urls, cpu: dict[str, float]) -> Load:
    """The bare endpoint at `args.connections` after a warm-up (it stores nothing, so the tasks it
    posts to can be used again); `cpu` gets its loop's CPU seconds."""
    with running(baseline_server(work)) as base:
        load(base.port, urls, connections=args.connections, duration=min(2.0, args.duration))  # warm-up
        with cpu_per_request(base, cpu):
            return load(base.port, urls, connections=args.connections, duration=args.duration)


def scenario_postgres(args: argparse.Namespace, work: Path, report: Report) -> None:
    """Callback ingest on PostgreSQL, beside SQLite's (no target yet: the ratio is reported)."""
    base_url = os.environ.get("RECEIVER_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
    url = f"{base_url}?schema=bench_{os.getpid()}_{int(time.time())}"
    try:
        seed_postgres(url, args.tasks, work / "pg-urls.txt")
    except (OSError, ImportError) as exc:
        report.notes.append(f"postgres: skipped, {base_url} is not reachable ({exc})")
        return
    urls = Urls(work / "pg-urls.txt", args.tasks)
    try:
        if report.baseline_rps is None:
            report.baseline_rps = measure_baseline(args, work, urls, {}).rate
            urls.cursor = 0
        cpu: dict[str, float] = {}
        with running(receiver_server(work, url)) as server:
            load(server.port, urls, connections=args.connections, duration=min(2.0, args.duration))
            with cpu_per_request(server, cpu):
                measured = load(server.port, urls, connections=args.connections, duration=args.duration)
    finally:
        drop_postgres_schema(url)
    ratio = measured.rate / report.baseline_rps
    sqlite_rps = report.figures.get("ingest", {}).get("receiver_rps")
    report.figures["postgres"] = {
        "receiver_rps": round(measured.rate, 1),
        "receiver_p50_ms": measured.p50_ms,
        "receiver_p99_ms": measured.p99_ms,
        "ratio_to_baseline": round(ratio, 3),
        "ratio_to_sqlite": round(measured.rate / sqlite_rps, 3) if sqlite_rps else None,
        "errors": measured.errors,
        "cpu_us_per_request": {"receiver_loop": _us(cpu.get("loop", 0.0), measured.requests)},
    }
    report.row(
        f"ingest: receiver on PostgreSQL, {args.connections} conns",
        f"{measured.rate:,.0f}",
        f"{ratio:.2f}",
        f"{measured.p50_ms:.1f}",
        f"{measured.p99_ms:.1f}",
        "",
    )
    report.notes.append(
        f"CPU per callback on PostgreSQL: {report.figures['postgres']['cpu_us_per_request']['receiver_loop']:.0f} µs"
        " (request loop; PostgreSQL's own processes are not counted)"
    )


def scenario_soak(args: argparse.Namespace, work: Path, report: Report) -> None:
    """Constant load for `--soak` seconds: RSS after warm-up vs at the end."""
    database = work / "soak.db"
    seed_sqlite(database, args.tasks, work / "soak-urls.txt")
    urls = Urls(work / "soak-urls.txt", args.tasks)
    warmup = min(10.0, args.soak / 4)
    with running(receiver_server(work, f"sqlite:///{database}")) as server, server.sampling(every=0.5):
        result = load(server.port, urls, connections=args.connections, duration=args.soak)
        samples = server.samples
        peak = server.peak_rss()
    start = samples[0][0]
    after_warmup = next(rss for t, rss in samples if t - start >= warmup)
    at_end = max(rss for t, rss in samples if t - start >= args.soak - 2)
    growth = (at_end - after_warmup) / after_warmup
    report.figures["soak"] = {
        "seconds": args.soak,
        "rps": round(result.rate, 1),
        "rss_after_warmup_mb": round(after_warmup / 2**20, 1),
        "rss_end_mb": round(at_end / 2**20, 1),
        "growth": round(growth, 4),
        "peak_rss_mb": round(peak / 2**20, 1),
    }
    report.row(
        f"soak {args.soak:g} s: RSS warm → end (MB)",
        f"{result.rate:,.0f}",
        "",
        "",
        "",
        f"{_mb(after_warmup)} → {_mb(at_end)} ({growth:+.1%})",
    )


@contextmanager
def sink(work: Path, ports: int) -> Iterator[tuple[list[int], int]]:
    """Subscriber endpoints in their own process (bench/sink.py): (their ports, the control port)."""
    with (work / "sink.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, str(HERE / "sink.py"), "--ports", str(ports)], stdout=subprocess.PIPE, stderr=log
        )
    try:
        assert process.stdout is not None
        announced = json.loads(process.stdout.readline())
        yield announced["ports"], announced["control"]
    finally:
        process.terminate()
        process.wait(10)


def sink_arrivals(control: int) -> list[list[Any]]:
    arrivals: list[list[Any]] = httpx.get(f"http://127.0.0.1:{control}/stats", timeout=30).json()["arrivals"]
    return arrivals


def wait_for_arrivals(control: int, expected: int, *, timeout: float) -> list[list[Any]]:
    deadline = time.monotonic() + timeout
    while True:
        arrivals = sink_arrivals(control)
        if len(arrivals) >= expected or time.monotonic() > deadline:
            return arrivals
        time.sleep(0.2)


def subscribe(server: Server, urls: list[str], events: list[str]) -> None:
    headers = {"authorization": "Bearer bench-api-key"}
    for url in urls:
        answer = httpx.post(
            f"http://127.0.0.1:{server.port}/v1/subscriptions", json={"url": url, "events": events}, headers=headers
        )
        answer.raise_for_status()


def scenario_fanout(args: argparse.Namespace, work: Path, report: Report) -> None:
    """Signed deliveries per second to 10 local subscribers, keep-alive connections reused."""
    events = max(200, int(args.duration * 120))
    database = work / "fanout.db"
    seed_sqlite(database, events, work / "fanout-urls.txt")
    urls = Urls(work / "fanout-urls.txt", events)
    with sink(work, 10) as (ports, control), running(receiver_server(work, f"sqlite:///{database}")) as server:
        subscribe(server, [f"http://127.0.0.1:{port}/hook" for port in ports], ["task.succeeded"])
        expected = events * len(ports)
        started = time.time()
        python_load(server.port, urls, connections=16, duration=0, total=events)
        arrivals = wait_for_arrivals(control, expected, timeout=120)
    last = max(a[0] for a in arrivals) if arrivals else started
    rate = len(arrivals) / max(last - started, 1e-9)
    ids = [a[2] for a in arrivals]
    report.figures["fanout"] = {
        "subscribers": len(ports),
        "events": events,
        "deliveries_expected": expected,
        "deliveries_received": len(arrivals),
        "distinct_webhook_ids_per_subscriber": len(set(ids)) // max(len(ports), 1),
        "deliveries_per_second": round(rate, 1),
    }
    report.row(f"fan-out: {len(ports)} subscribers, deliveries/s", f"{rate:,.0f}", "", "", "", "")
    if len(arrivals) < expected:
        report.notes.append(f"fan-out: only {len(arrivals)} of {expected} deliveries arrived within 120 s")


def mean_delivery_latency_ms(server: Server) -> float | None:
    """The receiver's own view of its delivery attempts (receiver_delivery_latency_seconds)."""
    text = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=10).text
    total = re.search(r"^receiver_delivery_latency_seconds_sum ([\d.e+-]+)$", text, re.M)
    count = re.search(r"^receiver_delivery_latency_seconds_count ([\d.e+-]+)$", text, re.M)
    if not total or not count or float(count.group(1)) == 0:
        return None
    return round(float(total.group(1)) / float(count.group(1)) * 1000, 2)


def scenario_latency(args: argparse.Namespace, work: Path, report: Report) -> None:
    """From the provider's POST to the subscriber receiving the signed event, at a fixed rate."""
    rate = args.rate
    count = int(rate * args.duration)
    database = work / "latency.db"
    task_ids = seed_sqlite(database, count, work / "latency-urls.txt")
    paths = (work / "latency-urls.txt").read_text().split()
    sent: dict[str, float] = {}
    with sink(work, 1) as (ports, control), running(receiver_server(work, f"sqlite:///{database}")) as server:
        subscribe(server, [f"http://127.0.0.1:{ports[0]}/hook"], ["task.succeeded"])
        counter = iter(range(count))

        def next_request() -> bytes:
            return loadgen.request_bytes("127.0.0.1", server.port, paths[next(counter)], BODY)

        def on_sent(index: int, moment: float) -> None:
            sent[task_ids[index]] = moment

        result = asyncio.run(
            loadgen.open_loop(
                "127.0.0.1", server.port, next_request, rate=rate, duration=args.duration, on_sent=on_sent
            )
        )
        arrivals = wait_for_arrivals(control, count, timeout=60)
        attempt_ms = mean_delivery_latency_ms(server)
    first: dict[str, float] = {}
    for moment, _, _, task_id in arrivals:
        if task_id is not None and task_id not in first:
            first[task_id] = moment
    if os.environ.get("BENCH_DUMP"):
        Path(os.environ["BENCH_DUMP"]).write_text(
            json.dumps(sorted((sent[t], (first[t] - sent[t]) * 1000) for t in sent if t in first))
        )
    latencies = sorted((first[t] - sent[t]) * 1000 for t in sent if t in first)
    missing = len(sent) - len(latencies)

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] if latencies else float("nan")

    report.figures["latency"] = {
        "rate": rate,
        "callbacks": len(sent),
        "callback_p50_ms": round(result.percentile(50) * 1000, 2),
        "callback_p99_ms": round(result.percentile(99) * 1000, 2),
        "delivered": len(latencies),
        "missing": missing,
        "end_to_end_p50_ms": round(pct(50), 2),
        "end_to_end_p99_ms": round(pct(99), 2),
        "end_to_end_max_ms": round(latencies[-1], 2) if latencies else None,
        "mean_attempt_ms": attempt_ms,
    }
    report.row(
        f"callback → subscriber at {rate:g}/s", f"{result.rate:,.0f}", "", f"{pct(50):.1f}", f"{pct(99):.1f}", ""
    )
    if missing:
        report.notes.append(f"latency: {missing} of {len(sent)} events did not reach the subscriber within 60 s")


def scenario_instructions(args: argparse.Namespace, work: Path, report: Report) -> None:
    """Instructions per callback, counted by valgrind's callgrind: the same figure on every run on
    the same machine and software, where times on this shared machine move by tens of percent
    between runs. The bare endpoint and the receiver each take the same fixed number of callbacks
    (8 connections) under callgrind; counters are zeroed after a warm-up and read after the load.
    User-space instructions only: the kernel's work (sockets, fsync) is not in them."""
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        report.notes.append("instructions: skipped, valgrind is not installed")
        return
    database = work / "instructions.db"
    count = 200 if args.quick else 2000
    seed_sqlite(database, 3 * count, work / "cg-urls.txt")
    urls = Urls(work / "cg-urls.txt", 3 * count)
    base = _instructions(baseline_server(work), urls, count)
    urls.cursor = 0
    receiver = _instructions(receiver_server(work, f"sqlite:///{database}"), urls, count)
    if not base.get("loop") or not receiver.get("loop") or not receiver.get("writer"):
        report.notes.append(f"instructions: callgrind gave no count (bare endpoint {base}, receiver {receiver})")
        return
    loop, writer = receiver["loop"] / count, receiver["writer"] / count
    bare = base["loop"] / count
    report.figures["instructions"] = {
        "callbacks": count,
        "baseline_per_request": round(bare),
        "receiver_loop_per_callback": round(loop),
        "receiver_writer_per_callback": round(writer),
        "ratio": round(bare / (loop + writer), 3),
    }
    report.notes.append(
        f"instructions per callback (callgrind, {count} callbacks at 8 connections): bare endpoint {bare / 1e3:,.0f}k;"
        f" receiver {loop / 1e3:,.0f}k (request loop) + {writer / 1e3:,.0f}k (SQLite writer)"
        f" = {(loop + writer) / bare:.1f}x the bare endpoint's"
    )


def _instructions(server: Server, urls: Urls, count: int) -> dict[str, int]:
    """Instructions each part of `server` ran while it took `count` callbacks under callgrind."""
    out = server.log.parent / f"callgrind-{server.name}"
    out.mkdir(exist_ok=True)
    server.argv = [
        "valgrind",
        "--tool=callgrind",
        "--trace-children=yes",  # the SQLite writer is a child process
        f"--callgrind-out-file={out}/%p",
        *server.argv,
    ]
    server.start_timeout = 180.0
    with running(server):
        python_load(server.port, urls, connections=8, duration=300, total=min(300, count))  # warm-up
        urls.advance(min(300, count), margin=8)
        parts = {pid: "loop" if pid == server.process.pid else _role(pid) for pid in server._tree()}  # type: ignore[union-attr]
        for pid in parts:
            subprocess.run(["callgrind_control", "-z", str(pid)], capture_output=True, check=False, timeout=60)
        done = python_load(server.port, urls, connections=8, duration=600, total=count)
        urls.advance(done.requests, margin=8)
        if done.ok != count:
            raise RuntimeError(f"{server.name} under callgrind answered {done.ok} of {count} callbacks with 2xx")
        for pid in parts:
            subprocess.run(["callgrind_control", "-d", str(pid)], capture_output=True, check=False, timeout=60)
    counted: dict[str, int] = {}
    for pid, part in parts.items():
        dump = out / f"{pid}.1"  # part 1: from the zeroing to the dump
        found = re.search(r"^summary: (\d+)", dump.read_text(), re.M) if dump.exists() else None
        if part is not None and found:
            counted[part] = counted.get(part, 0) + int(found.group(1))
    return counted


def _count(database: Path, sql: str) -> int:
    conn = sqlite3.connect(database)
    try:
        value: int = conn.execute(sql).fetchone()[0]
        return value
    finally:
        conn.close()


SCENARIOS: dict[str, Callable[[argparse.Namespace, Path, Report], None]] = {
    "ingest": scenario_ingest,
    "latency": scenario_latency,
    "fanout": scenario_fanout,
    "postgres": scenario_postgres,
    "soak": scenario_soak,
    "instructions": scenario_instructions,
}


# --- output -------------------------------------------------------------------------


def print_table(report: Report) -> None:
    header = ("scenario", "req/s", "ratio", "p50 ms", "p99 ms", "RSS MB")
    rows = [header, *report.rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(widths[j]) if j == 0 else cell.rjust(widths[j]) for j, cell in enumerate(row)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for note in report.notes:
        print(f"note: {note}")


#: The figures compared with earlier runs: (scenario, figure, label, whether higher is better).
HEADLINES = (
    ("ingest", "ratio", "ingest: receiver / bare endpoint", True),
    ("ingest", "receiver_rps", "ingest: receiver req/s", True),
    ("ingest", "receiver_p99_ms", "ingest: receiver p99 ms", False),
    ("ingest", "peak_rss_mb", "ingest: peak memory MB", False),
    ("latency", "end_to_end_p50_ms", "callback → subscriber p50 ms", False),
    ("latency", "end_to_end_p99_ms", "callback → subscriber p99 ms", False),
    ("fanout", "deliveries_per_second", "fan-out deliveries/s", True),
    ("postgres", "ratio_to_baseline", "PostgreSQL: receiver / bare endpoint", True),
    ("soak", "growth", "soak: memory growth", False),
    ("instructions", "receiver_loop_per_callback", "instructions: request loop", False),
    ("instructions", "receiver_writer_per_callback", "instructions: SQLite writer", False),
)


def compare_with_earlier(figures: dict[str, Any], results: Path, *, quick: bool) -> list[str]:
    """Each headline figure of this run beside the same figure in the latest earlier results file
    that has it (quick runs are compared with quick runs only), and the change. Files that do not
    read as results are passed over."""
    earlier = sorted((path for path in results.glob("*.json") if path.stem.endswith("-quick") == quick), reverse=True)
    documents: list[tuple[str, Any]] = []
    for path in earlier:
        with contextlib.suppress(OSError, ValueError):
            document = json.loads(path.read_text())
            documents.append((path.stem, document.get("figures") if isinstance(document, dict) else None))
    lines = []
    for scenario, name, label, higher_is_better in HEADLINES:
        now = _number(figures, scenario, name)
        if now is None:
            continue
        found = next(
            ((stem, value) for stem, doc in documents if (value := _number(doc, scenario, name)) is not None), None
        )
        if found is None:
            continue
        stem, before = found
        if before == now:
            change = "same"
        elif before == 0:
            change = "new"
        else:
            percent = (now - before) / abs(before) * 100
            better = (now > before) == higher_is_better
            change = f"{percent:+.1f} % ({'better' if better else 'worse'})"
        lines.append(f"{label}: {_figure(before)} ({stem}) → {_figure(now)}, {change}")
    return lines


def _number(figures: Any, scenario: str, name: str) -> float | None:
    """`figures[scenario][name]` when it is a number, else None."""
    section = figures.get(scenario) if isinstance(figures, dict) else None
    value = section.get(name) if isinstance(section, dict) else None
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _figure(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated: {', '.join(SCENARIOS)}")
    parser.add_argument("--duration", type=float, default=None, help="seconds per measured load run (10)")
    parser.add_argument("--soak", type=float, default=None, help="seconds of the memory soak (60)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rate", type=float, default=1000.0, help="callbacks/s of the latency run")
    parser.add_argument("--tasks", type=int, default=None, help="tasks seeded per database (300000)")
    parser.add_argument("--quick", action="store_true", help="short runs: a smoke test of the harness")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    quick = {"duration": 2.0, "soak": 8.0, "tasks": 20_000}
    full = {"duration": 10.0, "soak": 60.0, "tasks": 300_000}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if not shutil.which("wrk"):
        print("wrk not found: falling back to the Python load generator (figures will be lower)")

    report = Report()
    with tempfile.TemporaryDirectory(prefix="receiver-bench-") as folder:
        for name in chosen:
            print(f"running {name} …", flush=True)
            SCENARIOS[name](args, Path(folder), report)
    print()
    print_table(report)
    compared = compare_with_earlier(report.figures, args.results, quick=args.quick)
    if compared:
        print(f"\ncompared with the latest earlier run in {args.results} that has each figure:")
        for line in compared:
            print(f"  {line}")
    stamp = time.strftime("%Y-%m-%dT%H-%M-%S")
    document = {
        "date": stamp,
        "machine": machine(),
        "args": vars(args) | {"results": str(args.results)},
        "figures": report.figures,
        "notes": report.notes,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"{stamp}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nfigures written to {path.relative_to(HERE.parent) if path.is_relative_to(HERE.parent) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
