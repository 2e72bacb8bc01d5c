"""FHIR dates, dateTimes and Periods as Python datetimes (always timezone-aware, UTC)."""

from __future__ import annotations

import calendar
import re
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

_DATE_TIME = re.compile(
    r"^(?P<year>\d{4})(?:-(?P<month>\d{2})(?:-(?P<day>\d{2})"
    r"(?:T(?P<hour>\d{2}):(?P<minute>\d{2})(?::(?P<second>\d{2})(?P<fraction>\.\d+)?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


def parse_fhir_datetime(value: str, *, end_of_period: bool = False) -> datetime:
    """A FHIR date/dateTime as an aware datetime.

    A partial value (``2024``, ``2024-05``, ``2024-05-01``) stands for a whole period:
    its first instant, or with ``end_of_period`` its last, so a participation that
    "ends 2024-05-01" still covers that whole day. Values without a zone are read as UTC.
    Raises ValueError for anything else, OverflowError for an instant beyond year 9999 in
    UTC (``9999-12-31T23:00:00-05:00``).
    """
    match = _DATE_TIME.match(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ValueError("not a FHIR date or dateTime")
    year = int(match["year"])
    month = int(match["month"] or (12 if end_of_period else 1))
    day_default = calendar.monthrange(year, month)[1] if end_of_period else 1
    day = int(match["day"] or day_default)
    zone = _zone(match["tz"])
    if match["hour"] is None:
        if end_of_period:  # (the day's last instant, not the next day's first: 9999-12-31)
            return datetime(year, month, day, 23, 59, 59, 999999, tzinfo=zone)
        return datetime(year, month, day, tzinfo=zone)
    fraction = match["fraction"] or ""
    micros = int((fraction[1:] + "000000")[:6]) if fraction else 0
    moment = datetime(
        year,
        month,
        day,
        int(match["hour"]),
        int(match["minute"]),
        int(match["second"] or 0),
        micros,
        tzinfo=zone,
    )
    return moment.astimezone(timezone.utc)


def period_bounds(period: Any) -> tuple[datetime | None, datetime | None] | None:
    """A FHIR Period as (first covered instant, last covered instant); None for either
    side means open. An absent period is always open; an unreadable one is None (access
    decisions fail closed on it)."""
    if period is None:
        return None, None
    if not isinstance(period, Mapping):
        return None
    try:
        start = parse_fhir_datetime(period["start"]) if period.get("start") else None
        end = parse_fhir_datetime(period["end"], end_of_period=True) if period.get("end") else None
    except (ValueError, TypeError, ArithmeticError):
        # (ArithmeticError: an instant Python cannot hold, at the edge of year 1 or 9999.)
        return None
    return start, end


def period_covers(period: Any, now: datetime) -> bool:
    """Whether a FHIR Period (absent = always) includes ``now``.

    An unreadable start or end does not cover: access decisions fail closed.
    """
    bounds = period_bounds(period)
    if bounds is None:
        return False
    start, end = bounds
    return not ((start is not None and now < start) or (end is not None and now > end))


def format_fhir_instant(moment: datetime) -> str:
    """An aware datetime as a FHIR instant/dateTime in UTC with milliseconds."""
    utc = moment.astimezone(timezone.utc)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def _zone(text: str | None) -> timezone:
    if not text or text == "Z":
        return timezone.utc
    sign = 1 if text[0] == "+" else -1
    hours, minutes = int(text[1:3]), int(text[4:6])
    return timezone(sign * timedelta(hours=hours, minutes=minutes))
