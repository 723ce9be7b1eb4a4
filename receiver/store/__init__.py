"""Storage backends, picked from the database URL.

store = create_store("sqlite:///./data/receiver.db", clock=clock)
store = create_store("postgresql://user@host/db?schema=receiver", clock=clock)
"""

from __future__ import annotations

from receiver.broadcast import ChangeFeed
from receiver.clock import system_clock
from receiver.config import sqlite_path
from receiver.store.base import Store
from receiver.types import Clock

__all__ = ["Store", "create_store"]


def create_store(url: str, *, clock: Clock = system_clock, feed: ChangeFeed | None = None) -> Store:
    """The backend named by `url`'s scheme, imported lazily."""
    if url.startswith("sqlite:///"):
        from receiver.store.sqlite import SQLiteStore

        path = sqlite_path(url)
        if path is None:  # readers and the writer are separate connections: they need a file
            raise ValueError("SQLite needs a file path (sqlite:///./data/receiver.db), not :memory:")
        return SQLiteStore(path, clock=clock, feed=feed)
    if url.startswith(("postgresql://", "postgres://")):
        from receiver.store.postgres import PostgresStore

        return PostgresStore(url, clock=clock, feed=feed)
    raise ValueError(f"unsupported database URL {url!r}: use sqlite:///path or postgresql://…")
