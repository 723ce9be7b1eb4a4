"""Subscriber endpoints for the benchmarks: fast, and keeping score.

    python bench/sink.py --ports 10 --control 9100

Listens on `--ports` ephemeral ports of 127.0.0.1 (printed as JSON on the
first line of stdout, with the control port), answers every POST with 200 at
once (HTTP/1.1, keep-alive), and records for each request its arrival time and
`webhook-id`, and the task id of the event when its body names one.
`GET /stats` on the control port returns the counts and the arrivals;
`POST /reset` clears them. Plain asyncio protocols: the sink must never be the
bottleneck of what it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from typing import Any

_TASK_ID = re.compile(rb'"data":\{"id":"(tsk_[0-9a-f]+)"')


class Score:
    def __init__(self) -> None:
        self.arrivals: list[tuple[float, int, str, str | None]] = []  # (time, port, webhook-id, task id)

    def as_json(self) -> bytes:
        per_port: dict[int, int] = {}
        for _, port, _, _ in self.arrivals:
            per_port[port] = per_port.get(port, 0) + 1
        return json.dumps({"count": len(self.arrivals), "per_port": per_port, "arrivals": self.arrivals}).encode()


class Endpoint(asyncio.Protocol):
    """A minimal HTTP/1.1 server: POST → 200 with an empty JSON body, connections kept alive."""

    def __init__(self, score: Score) -> None:
        self.score = score
        self.port = 0
        self.buffer = b""
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:  # uvloop's transports are not asyncio.Transport
        self.transport = transport
        self.port = transport.get_extra_info("sockname")[1]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buffer[:head_end].decode("latin-1")
            length = 0
            webhook_id = ""
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                lowered = name.strip().lower()
                if lowered == "content-length":
                    length = int(value)
                elif lowered == "webhook-id":
                    webhook_id = value.strip()
            end = head_end + 4 + length
            if len(self.buffer) < end:
                return
            body = self.buffer[head_end + 4 : end]
            self.buffer = self.buffer[end:]
            found = _TASK_ID.search(body)
            self.score.arrivals.append((time.time(), self.port, webhook_id, found.group(1).decode() if found else None))
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")


class Control(asyncio.Protocol):
    def __init__(self, score: Score) -> None:
        self.score = score
        self.buffer = b""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        if self.buffer.startswith(b"POST /reset"):
            self.score.arrivals.clear()
            body = b"{}"
        else:
            body = self.score.as_json()
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        self.transport.close()


async def main(ports: int) -> None:
    loop = asyncio.get_running_loop()
    score = Score()
    listening: list[int] = []
    servers: list[Any] = []
    for _ in range(ports):
        server = await loop.create_server(lambda: Endpoint(score), "127.0.0.1", 0)
        listening.append(server.sockets[0].getsockname()[1])
        servers.append(server)
    control = await loop.create_server(lambda: Control(score), "127.0.0.1", 0)
    print(json.dumps({"ports": listening, "control": control.sockets[0].getsockname()[1]}), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ports", type=int, default=10)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(main(args.ports))
    except KeyboardInterrupt:
        sys.exit(0)
