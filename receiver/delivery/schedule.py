"""When a failed delivery is tried again.

    schedule = RetrySchedule(settings.retry_schedule, rng=random.Random())
    schedule.delay_after(1)                   # after the first attempt: ~5 s (±20 %)
    schedule.delay_after(1, retry_after=60)   # the endpoint asked for a minute: 60 s
    schedule.delay_after(8)                   # None: no attempt left, the delivery fails

The schedule lists the wait before each attempt, the first being the
immediate one (`0,5,300,…`: at once, 5 s after the first failure, 5 min after
the second, …), so N values mean N attempts, as Svix counts them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from email.utils import parsedate_to_datetime

#: Spread of the random factor on every delay, so retries of many deliveries do not arrive in lockstep.
JITTER = 0.2
#: The longest `Retry-After` honoured (seconds); a larger value is cut to this.
MAX_RETRY_AFTER = 3600.0


class RetrySchedule:
    def __init__(
        self, delays: Sequence[float], *, rng: random.Random | None = None, max_retry_after: float = MAX_RETRY_AFTER
    ) -> None:
        if not delays:
            raise ValueError("a retry schedule needs at least one entry")
        self.delays = tuple(delays)
        self.rng = rng or random.Random()
        self.max_retry_after = max_retry_after

    @property
    def attempts(self) -> int:
        """How many attempts a delivery gets."""
        return len(self.delays)

    def delay_after(self, attempts: int, *, retry_after: float | None = None) -> float | None:
        """Seconds until the next attempt once `attempts` have failed; None when none is left.

        A `Retry-After` longer than the scheduled delay wins, up to `max_retry_after`.
        """
        if attempts >= len(self.delays):
            return None
        delay = self.delays[attempts] * self.rng.uniform(1 - JITTER, 1 + JITTER)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_retry_after))
        return delay


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """A `Retry-After` header (seconds or an HTTP date) as seconds from `now`; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # str.isdigit alone takes "²" and "٣", which float() refuses or misreads
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        return None
    return max(0.0, moment.timestamp() - now)
