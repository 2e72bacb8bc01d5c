"""The power levels of a care-team space or room, from the FHIR members (pure).

DESIGN §3 defaults: service user 100, practitioners 50, related persons and patients 0;
configurable by member type and by ``participant.role`` code. While a team is inactive
or suspended its rooms are read-only: sending needs a level no member has.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from synapse_fhir_module.care_team import Member

SERVICE_LEVEL = 100
READ_ONLY_EVENTS_DEFAULT = SERVICE_LEVEL
# Levels this module owns in the content; everything else in it is left as the room has it.
OWNED_KEYS = ("users", "events_default")


def member_level(member: Member, by_type: Mapping[str, int], by_role: Mapping[str, int]) -> int:
    """The highest level any of the member's roles (or else their type) grants."""
    role_levels = [by_role[role] for role in member.roles if role in by_role]
    return max(role_levels) if role_levels else by_type.get(member.member_type, 0)


def power_levels_content(
    current: Mapping[str, Any],
    members: Collection[Member],
    *,
    service_user: str,
    creators: Collection[str],
    keep: Mapping[str, int],
    by_type: Mapping[str, int],
    by_role: Mapping[str, int],
    read_only: bool,
) -> dict[str, Any]:
    """The new ``m.room.power_levels`` content.

    ``creators``: users the room version already makes all-powerful (room v12 creators
    must not be listed); ``keep``: levels of users outside FHIR to leave as they are
    (exempt users).
    """
    users: dict[str, int] = {user: level for user, level in keep.items() if level}
    if not read_only:
        cap = SERVICE_LEVEL - 1  # nobody from FHIR outranks the service user
        for member in members:
            level = min(member_level(member, by_type, by_role), cap)
            if level:
                users[member.user_id] = level
    if service_user not in creators:
        users[service_user] = SERVICE_LEVEL
    for creator in creators:
        users.pop(creator, None)
    content = dict(current)
    content["users"] = dict(sorted(users.items()))
    content["events_default"] = READ_ONLY_EVENTS_DEFAULT if read_only else 0
    return content
