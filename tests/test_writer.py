"""The SQLite writer process: batches, failures, and a writer that dies."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import pickle
import signal
import sqlite3
from functools import partial
from pathlib import Path

import pytest

from receiver.errors import NotFound, StoreError
from receiver.store import writer as writer_module
from receiver.store.writer import WriterProcess, _launcher, commit, connect

pytestmark = pytest.mark.anyio


def create(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS t (x INTEGER PRIMARY KEY, label TEXT)")


def insert(conn: sqlite3.Connection, *, x: int, label: str = "") -> int:
    conn.execute("INSERT INTO t (x, label) VALUES (?, ?)", (x, label))
    return x


def insert_then_fail(conn: sqlite3.Connection, *, x: int) -> None:
    conn.execute("INSERT INTO t (x) VALUES (?)", (x,))
    raise NotFound(f"no {x}", code="thing_not_found", details={"x": x})


def count(conn: sqlite3.Connection) -> int:
    value: int = conn.execute("SELECT count(*) FROM t").fetchone()[0]
    return value


def _cannot_be_rebuilt() -> None:
    raise RuntimeError("this answer does not unpickle")


class Unreadable:
    """Pickles in the writer, fails to unpickle in the receiver."""

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (_cannot_be_rebuilt, ())


def insert_unreadable(conn: sqlite3.Connection, *, x: int) -> Unreadable:
    insert(conn, x=x)
    return Unreadable()


def pid_of_writer(writer: WriterProcess) -> int:
    assert writer._pid is not None
    return writer._pid


async def started(path: Path) -> WriterProcess:
    writer = WriterProcess(str(path))
    await writer.start()
    await writer.run(create)
    return writer


async def test_concurrent_operations_share_commits(tmp_path: Path) -> None:
    writer = await started(tmp_path / "w.db")
    try:
        results = await asyncio.gather(*(writer.run(partial(insert, x=i)) for i in range(300)))
        assert results == list(range(300))
        assert await writer.run(count) == 300
        assert writer.batches < writer.operations / 4
    finally:
        await writer.stop()


async def test_a_failing_operation_is_undone_alone_and_keeps_its_error(tmp_path: Path) -> None:
    writer = await started(tmp_path / "w.db")
    try:
        outcomes = await asyncio.gather(
            writer.run(partial(insert, x=1)),
            writer.run(partial(insert_then_fail, x=2)),
            writer.run(partial(insert, x=1)),  # a constraint violation: a StoreError
            writer.run(partial(insert, x=3)),
            return_exceptions=True,
        )
        assert outcomes[0] == 1 and outcomes[3] == 3
        assert isinstance(outcomes[1], NotFound)
        assert (outcomes[1].code, outcomes[1].details) == ("thing_not_found", {"x": 2})
        assert isinstance(outcomes[2], StoreError)
        assert await writer.run(count) == 2  # 2 was rolled back with its operation
    finally:
        await writer.stop()


async def test_a_failing_operation_alone_in_its_batch_is_undone(tmp_path: Path) -> None:
    writer = await started(tmp_path / "w.db")
    try:
        with pytest.raises(NotFound):
            await writer.run(partial(insert_then_fail, x=7))
        assert await writer.run(count) == 0
        assert await writer.run(partial(insert, x=7)) == 7  # the transaction did not stay open
        assert await writer.run(count) == 1
    finally:
        await writer.stop()


#: How often each counted operation ran in this process (`commit` called directly, not in the writer).
RUNS: collections.Counter[str] = collections.Counter()


def insert_counted(conn: sqlite3.Connection, *, x: int) -> int:
    RUNS[f"insert {x}"] += 1
    return insert(conn, x=x)


def refuse_counted(conn: sqlite3.Connection, *, x: int) -> None:
    RUNS[f"refuse {x}"] += 1
    raise NotFound(f"no {x}", code="thing_not_found")


def run_batch(path: Path, *ops: partial[object]) -> list[tuple[bool, object]]:
    conn = connect(str(path))
    try:
        create(conn)
        RUNS.clear()
        return commit(conn, [pickle.dumps(op) for op in ops])
    finally:
        conn.close()


def rows(path: Path) -> list[int]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return [x for (x,) in conn.execute("SELECT x FROM t ORDER BY x")]


def test_a_refusal_that_changed_nothing_leaves_the_rest_of_its_batch_alone(tmp_path: Path) -> None:
    outcomes = run_batch(
        tmp_path / "w.db", partial(insert_counted, x=1), partial(refuse_counted, x=2), partial(insert_counted, x=3)
    )
    assert [ok for ok, _ in outcomes] == [True, False, True]
    assert isinstance(outcomes[1][1], NotFound)
    assert rows(tmp_path / "w.db") == [1, 3]
    assert RUNS == {"insert 1": 1, "refuse 2": 1, "insert 3": 1}  # each ran once: nothing was run again


def test_a_failure_after_a_write_runs_its_batch_again_each_operation_undone_alone(tmp_path: Path) -> None:
    outcomes = run_batch(
        tmp_path / "w.db", partial(insert_counted, x=1), partial(insert_then_fail, x=2), partial(insert_counted, x=3)
    )
    assert [ok for ok, _ in outcomes] == [True, False, True]
    assert rows(tmp_path / "w.db") == [1, 3]  # 2's insert was undone with it
    assert RUNS == {"insert 1": 2, "insert 3": 1}  # rolled back after 2 failed, then run again in savepoints


def create_then_refuse(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE made_by_a_refused_operation (a)")  # a schema change: no row changed
    raise NotFound("no", code="thing_not_found")


def swallow_a_rollback(conn: sqlite3.Connection) -> str:
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS r (x INTEGER PRIMARY KEY ON CONFLICT ROLLBACK)")
    conn.execute("INSERT INTO r VALUES (1)")
    with contextlib.suppress(sqlite3.IntegrityError):
        conn.execute("INSERT INTO r VALUES (1)")  # ON CONFLICT ROLLBACK ends the whole transaction
    return "fine, it says"


def test_a_refusal_after_a_schema_change_is_undone(tmp_path: Path) -> None:
    outcomes = run_batch(tmp_path / "w.db", partial(insert_counted, x=1), partial(create_then_refuse))
    assert [ok for ok, _ in outcomes] == [True, False]
    with contextlib.closing(sqlite3.connect(tmp_path / "w.db")) as conn:
        assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name LIKE 'made_by%'").fetchone() == (0,)
    assert rows(tmp_path / "w.db") == [1]


def test_a_batch_whose_transaction_ended_under_an_operation_fails_whole(tmp_path: Path) -> None:
    outcomes = run_batch(
        tmp_path / "w.db", partial(insert_counted, x=1), partial(swallow_a_rollback), partial(insert_counted, x=3)
    )
    assert [ok for ok, _ in outcomes] == [False, False, False]
    assert all(isinstance(error, StoreError) for _, error in outcomes)
    assert rows(tmp_path / "w.db") == []  # nothing acknowledged, nothing kept
    assert "insert 3" not in RUNS  # nothing ran after the transaction was gone (it would autocommit)


def temp_store(conn: sqlite3.Connection) -> int:
    value: int = conn.execute("PRAGMA temp_store").fetchone()[0]
    return value


async def test_savepoints_larger_than_sqlites_spill_threshold_are_undone_from_memory(tmp_path: Path) -> None:
    """Each operation's savepoint journal is kept in memory (no temporary files, no writable temp
    folder needed), and rolling one back still works when a batch's journals pass 64 KiB."""
    writer = await started(tmp_path / "w.db")
    try:
        assert await writer.run(temp_store) == 2  # MEMORY
        big = "x" * 16_384
        outcomes = await asyncio.gather(
            *(writer.run(partial(insert, x=i, label=big)) for i in range(40)),
            writer.run(partial(insert_then_fail, x=1000)),
            *(writer.run(partial(insert, x=i, label=big)) for i in range(40, 80)),
            return_exceptions=True,
        )
        assert isinstance(outcomes[40], NotFound)
        assert [o for o in outcomes if not isinstance(o, Exception)] == list(range(80))
        assert await writer.run(count) == 80
    finally:
        await writer.stop()


async def test_operations_must_be_picklable(tmp_path: Path) -> None:
    writer = await started(tmp_path / "w.db")
    try:
        with pytest.raises(TypeError, match="picklable"):
            await writer.run(lambda conn: None)
        assert await writer.run(partial(insert, x=5)) == 5  # the writer is unharmed
    finally:
        await writer.stop()


async def test_a_writer_that_dies_is_replaced(tmp_path: Path) -> None:
    writer = await started(tmp_path / "w.db")
    try:
        await writer.run(partial(insert, x=1))
        os.kill(pid_of_writer(writer), signal.SIGKILL)
        with pytest.raises(StoreError):
            for i in range(100, 10_000):  # fails from the moment the death is noticed
                await writer.run(partial(insert, x=i))
                await asyncio.sleep(0.001)
        for _ in range(500):  # a new writer takes over shortly
            try:
                assert await writer.run(count) >= 1
                break
            except StoreError:
                await asyncio.sleep(0.01)
        else:
            pytest.fail("no new writer started")
        assert await writer.run(partial(insert, x=2)) == 2
    finally:
        await writer.stop()


async def test_a_writer_is_replaced_when_its_helper_dies_in_the_middle_of_starting_it(tmp_path: Path) -> None:
    """The writer and its helper killed together (as a crash or an OOM kill may): the receiver's
    request to the dying helper goes unanswered, and a new helper must then start the writer."""
    writer = await started(tmp_path / "w.db")
    helper = _launcher._helper
    assert helper is not None
    try:
        await writer.run(partial(insert, x=1))
        os.kill(helper.pid, signal.SIGSTOP)  # holds the replacement's request unanswered…
        os.kill(pid_of_writer(writer), signal.SIGKILL)
        for _ in range(1000):
            if _launcher._lock.locked():  # …while the receiver waits for its answer
                break
            await asyncio.sleep(0.005)
        else:
            pytest.fail("no replacement was asked for")
        os.kill(helper.pid, signal.SIGKILL)  # …then the helper dies without answering
        for _ in range(500):
            try:
                assert await writer.run(count) == 1
                break
            except StoreError:
                await asyncio.sleep(0.01)
        else:
            pytest.fail("no new writer started after the helper died")
        assert _launcher._helper is not None and _launcher._helper.pid != helper.pid
        assert await writer.run(partial(insert, x=2)) == 2
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(helper.pid, signal.SIGKILL)
        await writer.stop()


async def test_answers_that_cannot_be_read_replace_the_writer_rather_than_hang(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever stops the receiver from reading the writer's answers fails what waits on them
    (a 503 to a provider, which retries) and starts a new writer; nothing waits for ever."""
    writer = await started(tmp_path / "w.db")
    try:
        real = writer_module._read_frame

        async def garbled(reader: asyncio.StreamReader) -> list[bytes]:
            monkeypatch.setattr(writer_module, "_read_frame", real)  # once
            raise ValueError("a frame that does not parse")

        monkeypatch.setattr(writer_module, "_read_frame", garbled)
        await writer.run(partial(insert, x=1))  # its answer was being read already
        with pytest.raises(StoreError):
            await asyncio.wait_for(writer.run(partial(insert, x=2)), 10)
        for _ in range(500):
            try:
                assert await writer.run(partial(insert, x=3)) == 3
                break
            except StoreError:
                await asyncio.sleep(0.01)
        else:
            pytest.fail("no new writer started")
    finally:
        await writer.stop()


async def test_stopping_ends_the_writer_process(tmp_path: Path) -> None:
    writer = await started(tmp_path / "w.db")
    pid = pid_of_writer(writer)
    await writer.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(StoreError):
        await writer.run(count)


async def test_a_database_that_cannot_open_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(StoreError, match="cannot open"):
        await WriterProcess(str(tmp_path / "dir.db")).start()


async def test_the_api_answers_503_while_the_writer_is_replaced(tmp_path: Path) -> None:
    import httpx

    from tests.conftest import start_receiver

    async with start_receiver(tmp_path) as running, httpx.AsyncClient(
        base_url=running.url, headers=dict(running.api.headers)
    ) as api:  # running.api refuses every 5xx; this test expects 503s
        writer = running.ctx.store._writer  # type: ignore[attr-defined]
        os.kill(pid_of_writer(writer), signal.SIGKILL)
        statuses = set()
        for _ in range(400):
            answer = await api.post("/v1/callback-urls", json={"provider": "xhuoapi"})
            statuses.add(answer.status_code)
            if answer.status_code == 503:
                assert answer.json()["error"]["code"] == "store_unavailable"
                assert answer.headers["retry-after"] == "1"
            if answer.status_code == 201 and 503 in statuses:
                break
            await asyncio.sleep(0.005)
        assert statuses <= {201, 503} and 201 in statuses


async def test_an_answer_that_cannot_be_read_fails_its_caller_alone(tmp_path: Path) -> None:
    writer = await started(tmp_path / "w.db")
    try:
        outcomes = await asyncio.gather(
            writer.run(partial(insert, x=1)),
            writer.run(partial(insert_unreadable, x=2)),
            writer.run(partial(insert, x=3)),
            return_exceptions=True,
        )
        assert outcomes[0] == 1 and outcomes[2] == 3
        assert isinstance(outcomes[1], StoreError) and "unreadable store result" in str(outcomes[1])
        assert await writer.run(count) == 3  # the write stood; the writer goes on
    finally:
        await writer.stop()


# --- what crosses to the writer and back once per callback pickles flat, and whole ---------------


def test_a_record_callback_operation_arrives_whole() -> None:
    from receiver.store.base import IncomingCallback, Lease
    from receiver.store.sqlite import RecordCallback
    from receiver.tasks import Report
    from receiver.types import TaskState

    callback = IncomingCallback(
        "cb_1", "tsk_1", 1.5, b'{"a": 1}', {"content-type": "application/json"}, "ab", "verified"
    )
    report = Report(TaskState.SUCCEEDED, "up-1", images=({"url": "https://cdn.example/a.png"},), warnings=("w",))
    for lease in (None, Lease("dispatcher-1", 60.0)):
        op = pickle.loads(pickle.dumps(RecordCallback(callback, report, 2.5, lease, 1000)))
        assert (op.callback, op.report, op.now, op.lease, op.max_callbacks) == (callback, report, 2.5, lease, 1000)
        assert op.report.state is TaskState.SUCCEEDED


def test_an_applied_answer_arrives_whole_whatever_its_transition_holds() -> None:
    from receiver.store.base import Applied, Delivery, DeliveryJob, Subscription
    from receiver.tasks import JobSpec, Transition
    from receiver.types import DeliveryStatus, EventType, Verdict
    from tests.test_tasks import task

    before, after = task(), task().replace(sequence=3, result={"images": [{"url": "u"}]}, warnings=("w",))
    delivery = Delivery(
        "dlv_1", "evt_1", "sub_1", "tsk_1", "task.succeeded", 3, DeliveryStatus.PENDING, 0, 1.0, 1.0, 1.0
    )
    subscription = Subscription("sub_1", "https://hooks.example/a", ("*",), "whsec_x", 1.0, 1.0)
    offered = (DeliveryJob(delivery, subscription, b"{}"),)
    answers = [
        Applied(after, Transition(after, (EventType.SUCCEEDED,), Verdict.ACCEPTED, None, (JobSpec("mirror", 1.0),))),
        Applied(after, Transition(after, (EventType.SUCCEEDED,)), 1, offered, logged=False),
        Applied(before, Transition(None, (), Verdict.IGNORED, "late")),
        Applied(before, Transition(None, (), Verdict.DUPLICATE)),
        Applied(after, Transition(before)),  # not what a store writes, but still pickled whole
    ]
    for applied in answers:
        back = pickle.loads(pickle.dumps(applied, protocol=pickle.HIGHEST_PROTOCOL))
        assert back == applied
        assert back.task.state is applied.task.state and back.verdict is applied.verdict
        assert (back.transition.task is back.task) == (applied.transition.task is applied.task)
