"""The per-user token buckets that bound identity lookups."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from synapse_fhir_module.identity import token_bucket
from synapse_fhir_module.identity.token_bucket import TokenBuckets


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_full_bucket_grants_up_to_its_capacity_then_says_how_long_to_wait() -> None:
    clock = Clock()
    buckets = TokenBuckets(10, 2.0, clock=clock)
    assert buckets.take("@anna:x", 6) == 0.0
    assert buckets.take("@anna:x", 4) == 0.0
    assert buckets.take("@anna:x", 3) == pytest.approx(1.5)  # 3 tokens at 2 a second
    assert buckets.take("@bram:x", 10) == 0.0  # each user has a bucket of their own
    clock.now += 1.5
    assert buckets.take("@anna:x", 3) == 0.0
    assert buckets.take("@anna:x", 1) == pytest.approx(0.5)


def test_a_refused_request_takes_nothing_and_refills_stop_at_the_capacity() -> None:
    clock = Clock()
    buckets = TokenBuckets(10, 1.0, clock=clock)
    assert buckets.take("@anna:x", 8) == 0.0
    assert buckets.take("@anna:x", 5) > 0  # refused ...
    assert buckets.take("@anna:x", 2) == 0.0  # ... and took nothing
    clock.now += 1000
    assert buckets.take("@anna:x", 10) == 0.0
    assert buckets.take("@anna:x", 1) > 0


def test_more_than_the_capacity_is_never_granted() -> None:
    assert math.isinf(TokenBuckets(10, 1.0).take("@anna:x", 11))


def test_full_buckets_are_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(token_bucket, "PRUNE_ABOVE", 3)
    clock = Clock()
    buckets = TokenBuckets(10, 1.0, clock=clock)
    for user in ("@a:x", "@b:x", "@c:x"):
        buckets.take(user, 5)
    clock.now += 100  # all three full again
    buckets.take("@d:x", 5)
    assert len(buckets) == 1


@given(
    st.lists(
        st.tuples(st.floats(min_value=0, max_value=5), st.integers(min_value=1, max_value=12)),
        max_size=40,
    )
)
def test_never_more_is_granted_than_the_capacity_plus_what_time_refilled(
    steps: list[tuple[float, int]],
) -> None:
    clock = Clock()
    start = clock.now
    buckets = TokenBuckets(10, 2.0, clock=clock)
    granted = 0
    for elapsed, amount in steps:
        clock.now += elapsed
        if buckets.take("@anna:x", amount) == 0.0:
            granted += amount
    assert granted <= 10 + (clock.now - start) * 2.0 + 1e-6
