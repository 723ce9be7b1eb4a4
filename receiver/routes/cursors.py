"""Opaque list cursors: the last id seen, base64url-encoded."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from typing import Protocol, TypeVar

from receiver.errors import InvalidRequest

_ID = re.compile(r"^[a-z]+_[0-9a-f]{32}$")


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


Item = TypeVar("Item", bound=_HasId)


def page(items: Sequence[Item], limit: int) -> tuple[Sequence[Item], str | None]:
    """A page of `items`, fetched `limit + 1` at a time, and the cursor to the next page: None
    when nothing follows (a full last page does not send a client to an empty one)."""
    if len(items) <= limit:
        return items, None
    shown = items[:limit]
    return shown, encode(shown[-1].id)


def encode(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).decode().rstrip("=")


def decode(cursor: str | None) -> str | None:
    if not cursor:
        return None
    try:
        value = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequest("'cursor' is not a cursor this API gave out.", details={"field": "cursor"}) from exc
    if not _ID.match(value):
        raise InvalidRequest("'cursor' is not a cursor this API gave out.", details={"field": "cursor"})
    return value
