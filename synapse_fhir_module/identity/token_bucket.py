"""Per-key token buckets, in memory: how many identity lookups a user may make.

Each key's bucket holds up to ``capacity`` tokens and regains ``per_second`` of them every
second; taking more than it holds is refused with the wait until it would hold enough.
Full buckets are forgotten (a forgotten bucket is a full one), so memory follows the users
who looked something up lately, not every user.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# Above this many remembered buckets, the full ones are dropped.
PRUNE_ABOVE = 10_000


class TokenBuckets:
    def __init__(
        self,
        capacity: float,
        per_second: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity <= 0 or per_second <= 0:
            raise ValueError("capacity and per_second must be more than zero")
        self._capacity = float(capacity)
        self._per_second = float(per_second)
        self._clock = clock
        # key → (tokens held, when that was counted)
        self._buckets: dict[str, tuple[float, float]] = {}

    @property
    def capacity(self) -> float:
        return self._capacity

    def take(self, key: str, amount: float) -> float:
        """Take ``amount`` tokens from ``key``'s bucket: 0.0 when granted, otherwise the
        seconds until the bucket would hold ``amount`` (nothing is taken then). An amount
        above the capacity is never granted (``inf``)."""
        if amount > self._capacity:
            return float("inf")
        now = self._clock()
        held = self._held(key, now)
        if held >= amount:
            self._buckets[key] = (held - amount, now)
            if len(self._buckets) > PRUNE_ABOVE:
                self._prune(now)
            return 0.0
        return (amount - held) / self._per_second

    def _held(self, key: str, now: float) -> float:
        remembered = self._buckets.get(key)
        if remembered is None:
            return self._capacity
        tokens, counted_at = remembered
        return min(self._capacity, tokens + max(0.0, now - counted_at) * self._per_second)

    def _prune(self, now: float) -> None:
        for key in [k for k in self._buckets if self._held(k, now) >= self._capacity]:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)
