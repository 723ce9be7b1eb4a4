"""Versioned SQL migrations, one folder per backend: `<backend>/NNNN_name.sql`."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True, slots=True)
class Migration:
    version: str  # "0001_initial"
    sql: str


def load(backend: str) -> list[Migration]:
    """Every migration of `backend`, oldest first."""
    folder = resources.files(__package__).joinpath(backend)
    found = [
        Migration(entry.name.removesuffix(".sql"), entry.read_text(encoding="utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    ]
    return sorted(found, key=lambda m: m.version)


def latest(backend: str) -> str:
    return load(backend)[-1].version
