"""Query parameters of the admin endpoints (pure): a bounded ``limit``, a ``from``, a
``care_team`` reference."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from synapse.module_api.errors import Codes, SynapseError

from synapse_fhir_module.fhir.conventions import is_fhir_id

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


def parse_care_team(args: Mapping[bytes, Sequence[bytes]] | None) -> str | None:
    """``care_team``: ``CareTeam/<id>`` (``CareTeam/`` may be left out), or None."""
    raw = (args or {}).get(b"care_team")
    if not raw or not raw[0]:
        return None
    try:
        value = raw[0].decode("ascii").strip()
    except UnicodeDecodeError:
        value = ""
    team_id = value.removeprefix("CareTeam/")
    if not is_fhir_id(team_id):
        raise SynapseError(400, "care_team must be CareTeam/<id>", Codes.INVALID_PARAM)
    return f"CareTeam/{team_id}"
