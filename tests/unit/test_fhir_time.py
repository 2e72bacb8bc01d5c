"""FHIR dates and Periods: partial dates stand for whole periods; unreadable fails closed."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from synapse_fhir_module.fhir.dates import (
    format_fhir_instant,
    parse_fhir_datetime,
    period_covers,
)

NOW = datetime(2026, 5, 15, 12, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("text", "end", "expected"),
    [
        ("2026", False, datetime(2026, 1, 1, tzinfo=timezone.utc)),
        ("2026", True, datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc)),
        ("2024-02", True, datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=timezone.utc)),
        ("2026-05-15", False, datetime(2026, 5, 15, tzinfo=timezone.utc)),
        ("2026-05-15T14:30:00+02:00", False, datetime(2026, 5, 15, 12, 30, tzinfo=timezone.utc)),
        ("2026-05-15T12:00:00.25Z", False, datetime(2026, 5, 15, 12, 0, 0, 250000, timezone.utc)),
    ],
)
def test_parse(text: str, end: bool, expected: datetime) -> None:
    assert parse_fhir_datetime(text, end_of_period=end) == expected


@pytest.mark.parametrize("text", ["", "yesterday", "2026-13", "26-05-01", "2026-05-15T25:00:00Z"])
def test_unreadable_is_an_error(text: str) -> None:
    with pytest.raises(ValueError):
        parse_fhir_datetime(text)


@pytest.mark.parametrize(
    ("period", "covers"),
    [
        (None, True),
        ({}, True),
        ({"start": "2026-01-01"}, True),
        ({"start": "2026-05-16"}, False),  # future
        ({"end": "2026-05-14"}, False),  # past
        ({"end": "2026-05-15"}, True),  # ends today: the whole day counts
        ({"end": "2026-05"}, True),
        ({"start": "2025", "end": "2025"}, False),
        ({"start": "2026-05-15T11:59:00Z", "end": "2026-05-15T12:01:00Z"}, True),
        ({"start": "sometime"}, False),  # unreadable: fail closed
        ("2026", False),
    ],
)
def test_period_covers(period: object, covers: bool) -> None:
    assert period_covers(period, NOW) is covers


def test_format_instant() -> None:
    moment = datetime(2026, 5, 15, 12, 0, 1, 234567, tzinfo=timezone.utc)
    assert format_fhir_instant(moment) == "2026-05-15T12:00:01.234Z"


def test_the_last_day_python_can_hold_is_a_period_end_like_any_other() -> None:
    from synapse_fhir_module.fhir.dates import period_bounds

    bounds = period_bounds({"end": "9999-12-31"})
    assert bounds is not None and bounds[1] is not None
    assert bounds[1].year == 9999
    assert period_bounds({"end": "9999"}) is not None
    assert period_covers({"end": "9999-12-31"}, datetime(2026, 1, 1, tzinfo=timezone.utc))


def test_instants_beyond_what_python_holds_are_unreadable_not_a_crash() -> None:
    from synapse_fhir_module.fhir.dates import period_bounds

    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for period in (
        {"end": "9999-12-31T23:00:00-05:00"},
        {"start": "0001-01-01T00:00:00+01:00"},
    ):
        assert period_bounds(period) is None
        assert not period_covers(period, now)  # fail closed
