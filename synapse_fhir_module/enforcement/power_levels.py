"""The power levels of a care-team space or room, from the FHIR members (pure).

design.md: mapping defaults: service user 100, practitioners 50, related persons and patients 0;
configurable by member type and by ``participant.role`` code. While a team is inactive
or suspended its rooms are read-only: sending needs a level no member has.

What binds a room to the care record, and what decides who is in it, is reserved to the
service user by the power levels themselves, not only by the module's callbacks: a
practitioner on another homeserver builds events against these levels, and state
resolution keeps only events the levels allowed. Membership comes from FHIR, so kick
and ban are reserved too, and so is redacting other people's messages (the record keeps
them; everyone may still redact their own). The module owns ``users``,
``users_default``, ``events_default``, the reserved ``events`` and the reserved actions
(``invite``, ``kick``, ``ban``, ``redact``); a sync puts them back when they differ.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from synapse_fhir_module.fhir.care_team import Member

SERVICE_LEVEL = 100
READ_ONLY_EVENTS_DEFAULT = SERVICE_LEVEL
RESERVED_EVENTS = (
    "org.synapse_fhir.care_team",
    "org.synapse_fhir.thread",
    "m.space.child",
    "m.space.parent",
    "m.room.join_rules",
    "m.room.history_visibility",
    "m.room.encryption",
    "m.room.tombstone",
    "m.room.server_acl",
    "m.room.power_levels",
    "m.room.canonical_alias",
    "m.room.guest_access",
)
# Membership comes from FHIR: only the service user invites (also what another homeserver
# could otherwise build for its users, out of this server's callbacks' sight), removes or
# bans, and redacts other people's messages.
RESERVED_ACTIONS = ("invite", "kick", "ban", "redact")
# What members may change in a room they share (level of a practitioner by default).
MEMBER_STATE_EVENTS = ("m.room.name", "m.room.topic", "m.room.avatar", "m.room.pinned_events")
MEMBER_STATE_LEVEL = 50
# Nobody gets a level by merely being in the room.
USERS_DEFAULT = 0


def creation_levels() -> dict[str, Any]:
    """``power_level_content_override`` for a room the module creates, so the reserved
    levels hold from the first event on. (Synapse replaces ``events`` as a whole.)"""
    events = {event_type: MEMBER_STATE_LEVEL for event_type in MEMBER_STATE_EVENTS}
    events.update({event_type: SERVICE_LEVEL for event_type in RESERVED_EVENTS})
    return {
        "events": events,
        "users_default": USERS_DEFAULT,
        **{action: SERVICE_LEVEL for action in RESERVED_ACTIONS},
    }


def reserve(current: Mapping[str, Any]) -> dict[str, Any]:
    """``current`` with every reserved level raised to the service user's (never lowered:
    room v12 puts the tombstone above 100, for creators only)."""
    content = dict(current)
    events = current.get("events")
    reserved = dict(events) if isinstance(events, Mapping) else {}
    for event_type in RESERVED_EVENTS:
        reserved[event_type] = max(_level(reserved.get(event_type)), SERVICE_LEVEL)
    content["events"] = reserved
    for action in RESERVED_ACTIONS:
        content[action] = max(_level(current.get(action)), SERVICE_LEVEL)
    content["users_default"] = USERS_DEFAULT
    return content


def _level(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


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
    content = reserve(current)
    content["users"] = dict(sorted(users.items()))
    content["events_default"] = READ_ONLY_EVENTS_DEFAULT if read_only else 0
    return content
