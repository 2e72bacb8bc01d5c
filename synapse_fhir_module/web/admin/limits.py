"""Query parameters of the admin endpoints (pure): a bounded ``limit`` and a ``from``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from synapse.module_api.errors import Codes, SynapseError

# (The longest value ``from`` takes: a CareTeam reference, "CareTeam/" and a FHIR id.)
MAX_FROM_LENGTH = 200


def parse_limit(args: Mapping[bytes, Sequence[bytes]] | None, *, default: int, maximum: int) -> int:
    """``limit``: 1..``maximum``, ``default`` when absent; anything else is a 400."""
    raw = (args or {}).get(b"limit")
    if not raw:
        return default
    try:
        limit = int(raw[0].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        limit = 0
    if not 1 <= limit <= maximum:
        raise SynapseError(400, f"limit must be 1-{maximum}", Codes.INVALID_PARAM)
    return limit


def parse_from(args: Mapping[bytes, Sequence[bytes]] | None) -> str | None:
    """``from``: where the previous page ended (its ``next``), or None for the first page."""
    raw = (args or {}).get(b"from")
    if not raw or not raw[0]:
        return None
    try:
        value = raw[0].decode("utf-8")
    except UnicodeDecodeError:
        value = ""
    if not value or len(value) > MAX_FROM_LENGTH or not value.isprintable():
        raise SynapseError(400, "from must be what a previous page gave", Codes.INVALID_PARAM)
    return value
