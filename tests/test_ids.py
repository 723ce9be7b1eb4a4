from __future__ import annotations

import re

from receiver.clock import FakeClock
from receiver.ids import new_id


def test_ids_have_a_prefix_and_32_hex_digits() -> None:
    assert re.fullmatch(r"tsk_[0-9a-f]{32}", new_id("tsk"))
    assert len({new_id("x") for _ in range(1000)}) == 1000


def test_ids_sort_in_creation_order() -> None:
    clock = FakeClock(1_790_000_000.0)
    made = []
    for _ in range(500):
        made.append(new_id("evt", clock))
        clock.advance(0.002)  # whole milliseconds apart: ids order by millisecond
    assert made == sorted(made)
