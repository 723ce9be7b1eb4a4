"""The statements that run on every callback or every few seconds read the index meant for them.

SQLite chooses a plan when a statement is prepared; a term it cannot see through (a bound
parameter where a partial index names a value, a column that leads no index) turns a lookup
into a walk over the whole table without failing any test of behaviour.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from receiver.store.sqlite import DUE_FOR_EXPIRY, _migrate, delete_jobs_sql


@pytest.fixture
def conn(tmp_path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(tmp_path / "plans.db", isolation_level=None)
    _migrate(conn)
    return conn


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
