"""Identifiers: a prefix, then a time-ordered, URL-safe random part.

Ids sort by creation time, so "newest first" is "id descending" and a list
cursor is simply the last id seen.
"""

from __future__ import annotations

import secrets

from receiver.clock import system_clock
from receiver.types import Clock

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case


def _base32(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_id(prefix: str, clock: Clock = system_clock) -> str:
    """`new_id("tsk")` -> `tsk_01jd3x5k7q8w2m4n6p8r0t2v4x` (26 chars after the prefix)."""
    millis = int(clock() * 1000)
    return f"{prefix}_{_base32(millis, 10)}{_base32(secrets.randbits(80), 16)}"
