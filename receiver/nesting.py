"""How deeply a JSON value nests, checked before anything else reads it.

    if too_deep(payload):
        raise InvalidPayload(...)

orjson reads up to 1024 levels but writes at most 254, so a body nested a few
hundred levels deep would be read, stored halfway and then fail to be written
back out (a 500 on every later read of the task). No provider nests anywhere
near MAX_DEPTH, so deeper bodies are refused at the door.
"""

from __future__ import annotations

from typing import Any

#: Levels of objects and arrays a request body may nest (the stored task adds a few of its own).
MAX_DEPTH = 64


def too_deep(value: Any, limit: int = MAX_DEPTH, *, source: bytes | None = None) -> bool:
    """Does `value` nest more than `limit` levels of dicts and lists? Iterative: no recursion limit.

    `source`, the JSON text `value` was read from: every level opens with a `{` or `[`, so a text
    with no more of those than `limit` (counted in C, strings included) cannot nest deeper, and
    the walk is skipped — as it is for every ordinary callback."""
    if source is not None and source.count(b"{") + source.count(b"[") <= limit:
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False
