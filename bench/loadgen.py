"""A small HTTP/1.1 load generator on asyncio streams (keep-alive, no dependencies).

Used when wrk is missing (closed loop: N connections as fast as they go) and for
fixed-rate runs (open loop: requests start on a schedule, latency measured from
the scheduled start so a stall is not hidden — no coordinated omission).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Result:
    started: float
    finished: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0

    @property
    def count(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        return self.count / max(self.finished - self.started, 1e-9)

    def ok(self) -> int:
        return sum(n for status, n in self.statuses.items() if 200 <= status < 300)

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def request_bytes(host: str, port: int, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return status


class _Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self, payload: bytes) -> int:
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(payload)
        try:
            return await _read_response(self.reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            await self.close()
            raise

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(ConnectionError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


async def closed_loop(
    host: str,
    port: int,
    next_request: Callable[[], bytes],
    *,
    connections: int,
    duration: float,
    total: int | None = None,
) -> Result:
    """`connections` clients sending back to back for `duration` seconds (or `total` requests)."""
    result = Result(started=time.perf_counter())
    deadline = result.started + duration if total is None else float("inf")
    budget = [total if total is not None else 10**18]

    async def client() -> None:
        conn = _Connection(host, port)
        try:
            while time.perf_counter() < deadline and budget[0] > 0:
                budget[0] -= 1
                sent = time.perf_counter()
                try:
                    status = await conn.send(next_request())
                except (OSError, asyncio.IncompleteReadError):
                    result.errors += 1
                    continue
                result.latencies.append(time.perf_counter() - sent)
                result.statuses[status] = result.statuses.get(status, 0) + 1
        finally:
            await conn.close()

    await asyncio.gather(*(client() for _ in range(connections)))
    result.finished = time.perf_counter()
    return result


async def open_loop(
    host: str,
    port: int,
    next_request: Callable[[], bytes],
    *,
    rate: float,
    duration: float,
    connections: int = 64,
    on_sent: Callable[[int, float], None] | None = None,
) -> Result:
    """Start one request every 1/rate seconds for `duration`; `on_sent(i, t)` sees each start."""
    result = Result(started=time.perf_counter())
    idle: asyncio.Queue[_Connection] = asyncio.Queue()
    for _ in range(connections):
        idle.put_nowait(_Connection(host, port))
    total = int(rate * duration)
    pending: set[asyncio.Task[None]] = set()

    async def one(i: int, scheduled: float) -> None:
        conn = await idle.get()
        payload = next_request()
        if on_sent is not None:
            on_sent(i, time.time())
        try:
            status = await conn.send(payload)
        except (OSError, asyncio.IncompleteReadError):
            result.errors += 1
        else:
            result.latencies.append(time.perf_counter() - scheduled)
            result.statuses[status] = result.statuses.get(status, 0) + 1
        finally:
            idle.put_nowait(conn)

    for i in range(total):
        scheduled = result.started + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(i, scheduled))
        pending.add(task)
        task.add_done_callback(pending.discard)
    await asyncio.gather(*pending)
    result.finished = time.perf_counter()
    while not idle.empty():
        await idle.get_nowait().close()
    return result
