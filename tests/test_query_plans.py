"""The statements that run on every callback or every few seconds read the index meant for them.

SQLite chooses a plan when a statement is prepared; a term it cannot see through (a bound
parameter where a partial index names a value, a column that leads no index) turns a lookup
into a walk over the whole table without failing any test of behaviour.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from receiver.store import migrations
from receiver.store.sqlite import (
    _INSERT_CALLBACK,
    _INSERT_DELIVERY,
    _INSERT_EVENT,
    DUE_FOR_EXPIRY,
    _migrate,
    _statements,
    _update_task_sql,
    delete_jobs_sql,
)


@pytest.fixture
def conn(tmp_path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(tmp_path / "plans.db", isolation_level=None)
    _migrate(conn)
    return conn


def ephemeral_tables(conn: sqlite3.Connection, sql: str) -> int:
    """How many temporary b-trees the compiled statement opens each time it runs."""
    names = re.findall(r":(\w+)", sql)
    params = dict.fromkeys(names) if names else (None,) * sql.count("?")
    return sum(row[1] == "OpenEphemeral" for row in conn.execute("EXPLAIN " + sql, params))


def plan(conn: sqlite3.Connection, sql: str, params: tuple[object, ...]) -> str:
    return " | ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params))


def test_the_expiry_sweep_reads_only_open_tasks_due(conn: sqlite3.Connection) -> None:
    for columns in ("id", "*"):
        steps = plan(conn, f"SELECT {columns} {DUE_FOR_EXPIRY}", (0.0, 100))
        assert "USING INDEX tasks_open_expiry" in steps and "TEMP B-TREE" not in steps, steps


@pytest.mark.parametrize("kept", [0, 1, 2])
def test_deleting_a_tasks_jobs_finds_them_by_task(conn: sqlite3.Connection, kept: int) -> None:
    steps = plan(conn, delete_jobs_sql(kept), ("tsk_1", *["poll"] * kept))
    assert "USING INDEX jobs_task (task_id=?)" in steps and "SCAN" not in steps, steps


# What every callback runs: the task's update (the columns a callback changes), its event and
# deliveries, its log row. A temporary b-tree costs a page allocated and zeroed per run; the
# partial index's `state IN ('queued', 'submitted', 'running')` cost two on every task update.
@pytest.mark.parametrize(
    "sql",
    [
        _update_task_sql(("state", "result", "sequence", "updated_at", "completed_at")),
        _update_task_sql(("state", "upstream_task_id", "sequence", "updated_at")),
        _INSERT_CALLBACK,
        _INSERT_EVENT,
        _INSERT_DELIVERY,
    ],
)
def test_a_callbacks_writes_build_no_temporary_btree(conn: sqlite3.Connection, sql: str) -> None:
    assert ephemeral_tables(conn, sql) == 0


def test_a_database_from_before_0004_gets_the_index_the_sweep_reads(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "old.db", isolation_level=None)
    conn.execute("CREATE TABLE schema_migrations (version TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    for migration in migrations.load("sqlite"):
        if migration.version >= "0004":
            break
        for statement in _statements(migration.sql):
            conn.execute(statement)
        conn.execute("INSERT INTO schema_migrations VALUES (?, 0)", (migration.version,))
    assert "state IN" in _index_sql(conn)

    assert _migrate(conn) == ["0004_open_expiry_without_in"]
    assert "state IN" not in _index_sql(conn)
    assert "USING INDEX tasks_open_expiry" in plan(conn, f"SELECT id {DUE_FOR_EXPIRY}", (0.0, 100))


def _index_sql(conn: sqlite3.Connection) -> str:
    sql: str = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'tasks_open_expiry'").fetchone()[0]
    return sql
