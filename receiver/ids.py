"""Identifiers: a prefix, then a time-ordered, URL-safe random part.

Ids sort by creation time, so "newest first" is "id descending" and a list
cursor is simply the last id seen.
"""

from __future__ import annotations

import os

from receiver.clock import system_clock
from receiver.types import Clock


def new_id(prefix: str, clock: Clock = system_clock) -> str:
    """`new_id("tsk")` -> `tsk_0193a4f1c2d8` + 20 more hex digits: 48 bits of milliseconds, then 80
    random bits. Hex keeps the ids in creation order when sorted as text."""
    return f"{prefix}_{int(clock() * 1000).to_bytes(6, 'big').hex()}{os.urandom(10).hex()}"
