"""Seed a database with submitted tasks and write their signed callback paths.

Seeding goes around the HTTP API (it would take minutes for the hundreds of
thousands of tasks a run needs) but through the store's own migrations and row
mapping, so the rows are exactly what the receiver writes itself.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import orjson

from receiver.ids import new_id
from receiver.signing import CallbackSigner
from receiver.store.rows import TASK_COLUMNS, task_params
from receiver.store.sqlite import SQLiteStore
from receiver.tasks import Task
from receiver.types import TaskState

SIGNING_KEY = "bench-signing-key"

# A ~1 KiB xhuoapi success callback, as seed 004 shows it.
BODY = orjson.dumps(
    {
        "success": True,
        "trace_id": "9b4b1ff3-90f2-470f-b082-1061ec2948cc",
        "data": {
            "created": 1721626477,
            "data": [
                {
                    "url": "https://platform.cdn.xhuoapi.ai/gpt-image/ab58a5df-6f46-4874-bff6-93169e2849a3_0.png",
                    "revised_prompt": "A cinematic portrait of a young woman standing in a convenience store at "
                    "night, illuminated by soft pink and cyan neon signs through the window. Shot on 35mm film, "
                    "shallow depth of field, slight grain, melancholic mood. " * 5,
                }
            ],
        },
    }
)


def _tasks(count: int) -> list[Task]:
    now = time.time()
    return [
        Task(
            id=new_id("tsk"),
            provider="xhuoapi",
            model="gpt-image-2",
            state=TaskState.SUBMITTED,
            request={"prompt": "a red apple", "size": "1024x1024"},
            created_at=now,
            updated_at=now,
            expires_at=now + 86400,
            sequence=2,
        )
        for _ in range(count)
    ]


def seed_sqlite(path: Path, count: int, urls_file: Path) -> list[str]:
    """Create the schema at `path`, insert `count` tasks, write one callback path per line;
    returns the task ids, in the order of the paths."""

    async def migrate() -> None:
        store = SQLiteStore(path)
        await store.open()
        await store.close()

    asyncio.run(migrate())
    tasks = _tasks(count)
    conn = sqlite3.connect(path)
    placeholders = ", ".join(":" + c for c in TASK_COLUMNS)
    with conn:
        conn.executemany(
            f"INSERT INTO tasks ({', '.join(TASK_COLUMNS)}) VALUES ({placeholders})",
            (task_params(t) for t in tasks),
        )
    conn.close()
    _write_urls(tasks, urls_file)
    return [t.id for t in tasks]


def _write_urls(tasks: list[Task], urls_file: Path) -> None:
    signer = CallbackSigner([SIGNING_KEY])
    urls_file.write_text("".join(f"/callbacks/{signer.mint(t.id, max_age=86400, scope='xhuoapi')}\n" for t in tasks))


def seed_postgres(url: str, count: int, urls_file: Path) -> list[str]:
    """The same for PostgreSQL (`url` names its schema with ?schema=…); returns the task ids."""
    import asyncpg

    from receiver.store.postgres import PostgresStore

    tasks = _tasks(count)

    async def seed() -> None:
        store = PostgresStore(url)
        await store.open()  # creates the schema and migrates
        await store.close()
        schema = url.rsplit("schema=", 1)[1].split("&", 1)[0]
        conn = await asyncpg.connect(url.split("?", 1)[0])
        try:
            records = [tuple(task_params(t)[c] for c in TASK_COLUMNS) for t in tasks]
            await conn.copy_records_to_table("tasks", records=records, columns=TASK_COLUMNS, schema_name=schema)
        finally:
            await conn.close()

    asyncio.run(seed())
    _write_urls(tasks, urls_file)
    return [t.id for t in tasks]


def drop_postgres_schema(url: str) -> None:
    import asyncpg

    schema = url.rsplit("schema=", 1)[1].split("&", 1)[0]

    async def drop() -> None:
        conn = await asyncpg.connect(url.split("?", 1)[0])
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(drop())
