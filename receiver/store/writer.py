"""The SQLite writer: one connection in its own process, with group commit.

    writer = WriterProcess("./data/receiver.db")
    await writer.start()
    value = await writer.run(partial(_record_callback, callback=…, report=…, now=…))

Every write is a picklable operation, `op(conn) -> value`: a module-level
function, usually wrapped in functools.partial, or a small callable object
that pickles cheaply (the one every callback sends, `sqlite.RecordCallback`). Operations queued while a
batch is being committed travel together as the next batch, which the writer
runs in one transaction and commits once: many durable writes share one
fsync. An operation that fails is undone alone (the batch is run again with
each operation in its own savepoint; see `commit`).

Why a process rather than a thread: SQLite releases Python's interpreter
lock around every statement, so a writer thread must win the lock back from
the busy request loop several times per operation; under load those
hand-overs, not the disk, capped the receiver at a fraction of what the loop
alone could serve. In its own process the writer runs beside the loop on
another core. The two talk over a socket pair; the writer ends when the
socket closes, so it never outlives the receiver, even one that was killed.
Writers are forked from a helper process (`python -m receiver.store.writer`)
started once per receiver process; see `_Launcher`.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import json
import os
import pickle
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any, BinaryIO

from receiver.errors import ApiError, StoreError
from receiver.logs import get_logger

Op = Callable[[sqlite3.Connection], Any]

log = get_logger("receiver.store")

_LENGTH = struct.Struct("!I")
_MAX_BATCH = 512  # operations per transaction
_MAX_FRAME = 8 << 20  # bytes of operations per transaction (callbacks carry bodies of up to 1 MiB)
# Batches on their way at once: the writer starts the next the moment one commits, without
# waiting for the receiver to read its answer and send more.
_PIPELINE = 2


class _Launcher:
    """Forks writer processes from a small helper process started once per receiver process.

    The helper is a fresh interpreter that has imported the store and runs no threads, so
    forking it is safe and fast (spawning a new interpreter per store would cost a fraction of
    a second each). It ends when the receiver does: its control socket closes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._control: socket.socket | None = None
        self._helper: subprocess.Popen[bytes] | None = None

    def launch(self, sock: socket.socket, path: str) -> int:
        """Start a writer serving `sock` on the database at `path`; returns its pid (blocking).

        A helper that ends before answering (killed together with the writer it forked, say)
        is a StoreError, and is replaced at the next launch. The request is not repeated here:
        the helper may have forked a writer on `sock` before it died, so the caller starts
        again with a new socket pair and closes this one, which ends such a writer."""
        with self._lock:
            if self._control is None or self._helper is None or self._helper.poll() is not None:
                self._start_helper()
            assert self._control is not None
            try:
                socket.send_fds(self._control, [path.encode()], [sock.fileno()])
                answer = self._control.recv(64)
            except OSError:
                answer = b""
            if not answer.isdigit():
                self._end_helper()
                raise StoreError("the SQLite writer's helper process ended before starting a writer")
            return int(answer)

    def close(self) -> None:
        """End the helper (at interpreter exit): it leaves when its control socket closes."""
        with self._lock:
            self._end_helper()

    def _end_helper(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._helper is not None:
            try:
                self._helper.wait(5)
            except subprocess.TimeoutExpired:
                self._helper.kill()
                self._helper.wait()
            self._helper = None

    def _start_helper(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {**os.environ, _CONTROL_FD: str(theirs.fileno()), _SYS_PATH: json.dumps(sys.path)}
        self._helper = subprocess.Popen(
            [sys.executable, "-m", "receiver.store.writer"],
            pass_fds=[theirs.fileno()],
            env=env,
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self._control = mine


_CONTROL_FD = "RECEIVER_WRITER_CONTROL_FD"
_SYS_PATH = "RECEIVER_WRITER_SYS_PATH"
_launcher = _Launcher()
atexit.register(_launcher.close)


def connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # a 200 means the callback survives power loss
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=10000")
    conn.execute("PRAGMA cache_size=-16384")  # 16 MiB of pages (SQLite's default is 2 MiB)
    # A batch run again after a failure puts each operation in a savepoint (`commit`); the pages
    # those touch are journalled for a rollback. Past 64 KiB SQLite spilled that journal to a
    # temporary file (a dozen writes per callback at batches of 50, and a writable temp folder
    # needed); in memory it stays, bounded by the batch (_MAX_BATCH, _MAX_FRAME).
    conn.execute("PRAGMA temp_store=MEMORY")
    return conn


class WriterProcess:
    """The parent's side: queues operations, ships them in batches, settles their futures."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.batches = 0  # commits made (for the benchmark and tests)
        self.operations = 0
        self._pending: list[tuple[bytes, asyncio.Future[Any]]] = []
        self._inflight: collections.deque[list[asyncio.Future[Any]]] = collections.deque()
        self._pid: int | None = None
        self._stream: asyncio.StreamWriter | None = None
        self._replies: asyncio.Task[None] | None = None
        self._broken: str | None = "not started"
        self._stopping = False
        self._revival: asyncio.Task[None] | None = None

    @property
    def broken(self) -> str | None:
        """Why the writer cannot take operations now (it died, is being started again, or was
        stopped), or None while it runs."""
        return self._broken

    async def start(self) -> None:
        mine, theirs = socket.socketpair()
        try:
            self._pid = await asyncio.to_thread(_launcher.launch, theirs, self.path)
        except BaseException:
            mine.close()  # a writer forked before its helper died reads EOF and ends
            raise
        finally:
            theirs.close()
        reader, self._stream = await asyncio.open_connection(sock=mine)
        try:
            ready = await _read_frame(reader)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            await self._reap()
            raise StoreError("the SQLite writer did not start") from exc
        problem = pickle.loads(ready[0])
        if problem is not None:
            self._stream.close()
            self._stream = None
            await self._reap()
            raise StoreError(f"cannot open the SQLite database: {problem}")
        self._broken = None
        self._replies = asyncio.create_task(self._reply_loop(reader), name="receiver-sqlite-replies")

    async def stop(self) -> None:
        """Let what is queued finish, then end the writer."""
        for _ in range(1000):  # bounded: ~10 s
            if (not self._inflight and not self._pending) or self._broken:
                break
            await asyncio.sleep(0.01)
        self._stopping = True
        if self._revival is not None:
            self._revival.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._revival
        if self._stream is not None:
            self._stream.close()
            with contextlib.suppress(ConnectionError):
                await self._stream.wait_closed()
            self._stream = None
        if self._replies is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._replies
            self._replies = None
        self._broken = self._broken or "stopped"
        await self._reap()

    async def _reap(self) -> None:
        """The writer ends when its socket closes; one that does not within 10 s is killed."""
        pid, self._pid = self._pid, None
        if pid is None:
            return
        for _ in range(1000):
            if not _alive(pid):
                return
            await asyncio.sleep(0.01)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    async def run(self, op: Op) -> Any:
        if self._broken is not None:
            raise StoreError(f"the SQLite writer is not running ({self._broken})")
        try:
            frame = pickle.dumps(op, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise TypeError(f"store operations must be picklable (module-level functions): {op!r}") from exc
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((frame, future))
        if len(self._inflight) < _PIPELINE:
            self._ship()
        return await future

    def _ship(self) -> None:
        assert self._stream is not None
        batch: list[tuple[bytes, asyncio.Future[Any]]] = []
        size = 0
        while self._pending and len(batch) < _MAX_BATCH:
            frame, future = self._pending[0]
            if batch and size + len(frame) > _MAX_FRAME:
                break
            self._pending.pop(0)
            batch.append((frame, future))
            size += len(frame)
        self._inflight.append([future for _, future in batch])
        self._stream.write(_frame([frame for frame, _ in batch]))

    async def _reply_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                replies = await _read_frame(reader)
                futures = self._inflight.popleft()
                for future, reply in zip(futures, replies, strict=True):
                    try:
                        ok, value = pickle.loads(reply)
                    except Exception as exc:  # an answer that cannot be rebuilt fails its caller alone
                        ok, value = False, StoreError(f"unreadable store result: {exc!r}")
                    if future.done():  # the caller went away; the write stands
                        continue
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
                self.batches += 1
                self.operations += len(futures)
                if self._pending:
                    self._ship()
        except Exception as exc:  # the writer died, or its answers no longer match their callers: replace it
            self._broken = self._broken or "the writer process ended"
            failure = StoreError("the SQLite writer stopped before answering")
            for future in [f for batch in self._inflight for f in batch] + [f for _, f in self._pending]:
                if not future.done():
                    future.set_exception(failure)
            self._inflight.clear()
            self._pending = []
            if not self._stopping:  # not a shutdown: the writer died; start another
                log.error("store.writer_died", backend="sqlite", error=repr(exc)[:200])
                self._revival = asyncio.create_task(self._revive(), name="receiver-sqlite-revive")

    async def _revive(self) -> None:
        """Start a new writer after one died (what it was answering failed with StoreError:
        nothing acknowledged is lost, the transaction it held was rolled back)."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        await self._reap()
        delay = 0.05
        while not self._stopping:
            try:
                await self.start()
            except Exception as exc:  # whatever it was, the store stays down until a writer runs: try again
                log.error("store.writer_restart_failed", backend="sqlite", error=repr(exc)[:200])
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            else:
                log.info("store.writer_restarted", backend="sqlite")
                return


def _frame(parts: list[bytes]) -> bytes:
    return b"".join([_LENGTH.pack(len(parts)), *(_LENGTH.pack(len(part)) + part for part in parts)])


async def _read_frame(reader: asyncio.StreamReader) -> list[bytes]:
    (count,) = _LENGTH.unpack(await reader.readexactly(4))
    parts = []
    for _ in range(count):
        (size,) = _LENGTH.unpack(await reader.readexactly(4))
        parts.append(await reader.readexactly(size))
    return parts


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- the writer processes -------------------------------------------------------------


def helper_main() -> None:
    """The helper: wait for launch requests, fork a writer for each, until the receiver goes."""
    sys.path[:0] = [entry for entry in json.loads(os.environ.pop(_SYS_PATH, "[]")) if entry not in sys.path]
    control = socket.socket(fileno=int(os.environ.pop(_CONTROL_FD)))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the receiver's to handle; EOF ends us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # writers are reaped by the kernel
    import receiver.store.sqlite  # noqa: F401  the operations every writer runs, imported once

    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, 4096, 1)
        except OSError:
            return
        if not message:
            return
        pid = os.fork()
        if pid == 0:
            control.close()
            try:
                serve(socket.socket(fileno=fds[0]), message.decode())
            finally:
                os._exit(0)
        for fd in fds:
            os.close(fd)
        control.send(str(pid).encode())


def serve(sock: socket.socket, path: str) -> None:
    """The writer's main loop: read a batch, run it in one transaction, answer, repeat.

    Ctrl-C and SIGTERM are for the receiver, which then closes the socket; the writer ignores
    them (as its helper does), so it never drops a batch the receiver is waiting for."""
    stream = sock.makefile("rb")
    try:
        conn = connect(path)
    except Exception as exc:
        sock.sendall(_frame([pickle.dumps(f"{type(exc).__name__}: {exc}")]))
        return
    sock.sendall(_frame([pickle.dumps(None)]))
    try:
        while (frames := _read_frame_blocking(stream)) is not None:
            sock.sendall(_frame([_portable(outcome) for outcome in commit(conn, frames)]))
    finally:
        conn.close()


def _read_frame_blocking(stream: BinaryIO) -> list[bytes] | None:
    head = stream.read(4)
    if len(head) < 4:
        return None
    (count,) = _LENGTH.unpack(head)
    parts = []
    for _ in range(count):
        (size,) = _LENGTH.unpack(stream.read(4))
        parts.append(stream.read(size))
    return parts


def commit(conn: sqlite3.Connection, frames: list[bytes]) -> list[tuple[bool, Any]]:
    """Run every operation in one transaction and commit once.

    The batch runs straight through, without a savepoint per operation: two statements each
    (SAVEPOINT, RELEASE) were a measurable share of a callback's write. An operation refused by
    a decision before it changed anything (a callback for another upstream task, say) has
    nothing to undo: its error is its outcome and the batch goes on. Any other failure rolls the
    transaction back and the batch runs again with each operation in a savepoint, so the one
    that fails is undone alone (a batch of one just keeps its failure).

    "Changed nothing" is read from the connection: no row changed (`total_changes`, to which a
    failed statement adds nothing), the schema is as the batch found it, and the transaction is
    still open. Rows changed by a statement are counted when it is read to its end, so an
    operation that refuses after a write must have read its statements whole; the stores'
    operations refuse before they write, or through a failed statement."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        schema = _schema_version(conn)
    except sqlite3.Error as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        return [(False, StoreError(str(exc)))] * len(frames)
    outcomes, failure = _straight(conn, frames, schema)
    if failure is not None:
        if not conn.in_transaction:  # SQLite ended the transaction itself: the whole batch is lost
            return [(False, failure if len(frames) == 1 else _lost(failure))] * len(frames)
        conn.execute("ROLLBACK")
        if len(frames) == 1:
            return [(False, failure)]
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            return [(False, StoreError(str(exc)))] * len(frames)
        outcomes = _each_in_a_savepoint(conn, frames)
    try:
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        return [(False, StoreError(f"commit failed: {exc}"))] * len(frames)
    return outcomes


def _straight(
    conn: sqlite3.Connection, frames: list[bytes], schema: int
) -> tuple[list[tuple[bool, Any]], Exception | None]:
    """The operations' outcomes; or, when one fails leaving something to undo (or the
    transaction ended under it), that failure."""
    outcomes: list[tuple[bool, Any]] = []
    for frame in frames:
        changed = conn.total_changes
        try:
            outcomes.append((True, pickle.loads(frame)(conn)))
        except ApiError as exc:  # a refusal: nothing to undo if nothing changed before it
            if conn.total_changes != changed or not conn.in_transaction or _schema_version(conn) != schema:
                return outcomes, exc
            outcomes.append((False, exc))
        except Exception as exc:
            return outcomes, _failure(exc)
        else:
            if not conn.in_transaction:  # an operation swallowed an error that rolled everything back
                return outcomes, StoreError("the transaction was rolled back during an operation")
    return outcomes, None


def _schema_version(conn: sqlite3.Connection) -> int:
    version: int = conn.execute("PRAGMA schema_version").fetchone()[0]
    return version


def _lost(failure: Exception) -> StoreError:
    return StoreError(f"the batch's transaction was rolled back: {failure}")


def _each_in_a_savepoint(conn: sqlite3.Connection, frames: list[bytes]) -> list[tuple[bool, Any]]:
    outcomes: list[tuple[bool, Any]] = []
    for frame in frames:
        conn.execute("SAVEPOINT op")
        try:
            value = pickle.loads(frame)(conn)
        except Exception as exc:  # the op's own writes are undone; the batch goes on
            conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
            outcomes.append((False, _failure(exc)))
        else:
            conn.execute("RELEASE op")
            outcomes.append((True, value))
    return outcomes


def _failure(exc: Exception) -> Exception:
    return StoreError(str(exc)) if isinstance(exc, sqlite3.Error) else exc


def _portable(outcome: tuple[bool, Any]) -> bytes:
    try:
        return pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # an answer that cannot travel is reported, never lost silently
        return pickle.dumps((False, StoreError(f"unpicklable store result: {exc!r}")))


if __name__ == "__main__":
    helper_main()
