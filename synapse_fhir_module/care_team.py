"""Who belongs to a CareTeam right now (DESIGN §3), as a pure function of FHIR JSON.

The input is the CareTeam and every resource it reaches (persons, PractitionerRoles,
nested CareTeams) keyed by ``Type/id``; the output is the Matrix user ids of the
members whose participation period covers ``now`` and whose person is active.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import attr

from synapse_fhir_module.fhir_time import period_covers
from synapse_fhir_module.identity import PERSON_TYPES, is_active, matrix_ids_of

logger = logging.getLogger(__name__)

# CareTeam.status values under which new members may enter the team's rooms.
ADMITTING_STATUSES = frozenset({"active", "proposed"})
MAX_NESTING = 5
# When one user is reached as several kinds of member, the first kind here wins.
TYPE_PRECEDENCE = ("Practitioner", "RelatedPerson", "Patient")
NO_ROLES: frozenset[str] = frozenset()

Resources = Mapping[str, Mapping[str, Any]]


@attr.s(frozen=True, auto_attribs=True)
class Member:
    user_id: str
    person: str  # "Practitioner/12"
    member_type: str  # Practitioner | RelatedPerson | Patient
    roles: frozenset[str] = frozenset()  # participant.role codes, "system|code"


@attr.s(frozen=True, auto_attribs=True)
class TeamMembership:
    team: str  # "CareTeam/12"
    status: str
    members: Mapping[str, Member]  # by Matrix user id
    # Participants whose person is marked inactive (they are not members).
    inactive: frozenset[str] = frozenset()
    subject: str | None = None  # "Patient/<id>", the team's patient
    name: str | None = None  # CareTeam.name (room names; never the patient's)

    @property
    def admits_members(self) -> bool:
        return self.status in ADMITTING_STATUSES

    def is_member(self, user_id: str) -> bool:
        return user_id in self.members


def resolve_membership(team_ref: str, resources: Resources, now: datetime) -> TeamMembership:
    """The current members of ``team_ref`` (which must be in ``resources``)."""
    team = resources[team_ref]
    found: dict[str, Member] = {}
    claimed_by: dict[str, set[str]] = {}
    inactive: set[str] = set()
    _collect(team_ref, resources, now, found, claimed_by, inactive, visiting=set(), depth=0)
    for user_id, persons in claimed_by.items():
        if len(persons) > 1:
            # Two people claiming one account is a data error: admit neither.
            logger.warning(
                "%s: one Matrix account is named by %d persons (%s); treating it as unmapped",
                team_ref,
                len(persons),
                ", ".join(sorted(persons)),
            )
            found.pop(user_id, None)
    return TeamMembership(
        team=team_ref,
        status=str(team.get("status") or "unknown"),
        members=found,
        inactive=frozenset(inactive - found.keys()),
        subject=reference_of(team.get("subject")),
        name=team["name"] if isinstance(team.get("name"), str) else None,
    )


def _collect(
    team_ref: str,
    resources: Resources,
    now: datetime,
    found: dict[str, Member],
    claimed_by: dict[str, set[str]],
    inactive: set[str],
    *,
    visiting: set[str],
    depth: int,
) -> None:
    if team_ref in visiting or depth > MAX_NESTING:
        return  # a cycle, or nesting deeper than any real care network
    team = resources.get(team_ref)
    if team is None:
        return
    if depth > 0 and team.get("status") not in ADMITTING_STATUSES:
        return  # an inactive nested team lends nobody to the outer team
    visiting = visiting | {team_ref}
    for participant in _dicts(team.get("participant")):
        if not period_covers(participant.get("period"), now):
            continue
        member_ref = reference_of(participant.get("member"))
        if member_ref is None:
            continue
        roles = _role_codes(participant)
        member_type = member_ref.split("/", 1)[0]
        if member_type == "CareTeam":
            _collect(
                member_ref,
                resources,
                now,
                found,
                claimed_by,
                inactive,
                visiting=visiting,
                depth=depth + 1,
            )
        elif member_type == "PractitionerRole":
            practitioner_ref = _active_role_practitioner(resources.get(member_ref), now)
            if practitioner_ref:
                _add_person(practitioner_ref, resources, roles, found, claimed_by, inactive)
        elif member_type in PERSON_TYPES:
            _add_person(member_ref, resources, roles, found, claimed_by, inactive)


def _add_person(
    person_ref: str,
    resources: Resources,
    roles: frozenset[str],
    found: dict[str, Member],
    claimed_by: dict[str, set[str]],
    inactive: set[str],
) -> None:
    person = resources.get(person_ref)
    if person is None:
        return
    if not is_active(person):
        inactive.update(matrix_ids_of(person))
        return
    # Interned: the same people sit in many teams, and every cached answer would otherwise
    # hold its own copies of their ids (measured by bench/scale).
    member_type = sys.intern(person_ref.split("/", 1)[0])
    person_ref = sys.intern(person_ref)
    roles = frozenset(map(sys.intern, roles)) if roles else NO_ROLES
    for user_id in map(sys.intern, matrix_ids_of(person)):
        claimed_by.setdefault(user_id, set()).add(person_ref)
        # (Per account: another person met earlier under one of this person's accounts
        # must not change what the next account is credited to.)
        member = Member(user_id, person_ref, member_type, roles)
        earlier = found.get(user_id)
        if earlier is not None:
            merged_roles = roles | earlier.roles
            if TYPE_PRECEDENCE.index(earlier.member_type) < TYPE_PRECEDENCE.index(member_type):
                member = Member(user_id, earlier.person, earlier.member_type, merged_roles)
            else:
                member = Member(user_id, person_ref, member_type, merged_roles)
        found[user_id] = member


def _active_role_practitioner(role: Mapping[str, Any] | None, now: datetime) -> str | None:
    if role is None or not is_active(role) or not period_covers(role.get("period"), now):
        return None
    ref = reference_of(role.get("practitioner"))
    return ref if ref and ref.startswith("Practitioner/") else None


def _role_codes(participant: Mapping[str, Any]) -> frozenset[str]:
    codes = set()
    for concept in _dicts(participant.get("role")):
        for coding in _dicts(concept.get("coding")):
            if coding.get("code"):
                codes.add(f"{coding.get('system', '')}|{coding['code']}")
    return frozenset(codes)


def reference_of(value: Any) -> str | None:
    """``{"reference": "Practitioner/12"}`` → ``Practitioner/12`` (relative refs only)."""
    if not isinstance(value, Mapping):
        return None
    ref = value.get("reference")
    if not isinstance(ref, str) or ref.count("/") < 1:
        return None
    parts = ref.split("/")
    # Accept "Type/id" and "Type/id/_history/v"; absolute URLs are not ours to follow.
    if "://" in ref:
        return None
    return f"{parts[0]}/{parts[1]}"


def _dicts(value: Any) -> list[Mapping[str, Any]]:
    if isinstance(value, list):
        return [item for item in value if isinstance(item, Mapping)]
    return []
