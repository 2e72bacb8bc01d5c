"""Who belongs to a CareTeam right now (design.md: mapping), as a pure function of FHIR JSON.

The input is the CareTeam and every resource it reaches (persons, PractitionerRoles,
nested CareTeams) keyed by ``Type/id``; the output is the Matrix user ids of the
members whose participation covers ``now`` and whose person is active.

Periods make membership a function of time as well. Each member carries the moment
their membership ends (the earliest end along the path that makes them a member: the
team's own period, the participant's, a PractitionerRole's, a nested team's), so an
answer kept in memory stops counting them at that very moment; and the answer names
its next boundary — any start or end still to come — so whoever keeps it knows when
to ask FHIR again (someone may be about to join) and when to make Matrix match.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Collection, Mapping
from datetime import datetime
from typing import Any

import attr

from synapse_fhir_module.fhir.conventions import PERSON_TYPES, dicts_in, reference_of
from synapse_fhir_module.fhir.dates import period_bounds
from synapse_fhir_module.fhir.persons import is_active, matrix_ids_of

logger = logging.getLogger(__name__)

# CareTeam.status values under which new members may enter the team's rooms.
ADMITTING_STATUSES = frozenset({"active", "proposed"})
MAX_NESTING = 5
# When one user is reached as several kinds of member, the first kind here wins.
TYPE_PRECEDENCE = ("Practitioner", "RelatedPerson", "Patient")
NO_ROLES: frozenset[str] = frozenset()

Resources = Mapping[str, Mapping[str, Any]]
# ("Practitioner/12", its resource) → the Matrix accounts that are that person.
AccountsOf = Callable[[str, Mapping[str, Any]], Collection[str]]


def explicit_accounts(reference: str, person: Mapping[str, Any]) -> Collection[str]:
    """The accounts a person names itself (no email identity)."""
    return matrix_ids_of(person)


@attr.s(frozen=True, auto_attribs=True)
class Member:
    user_id: str
    person: str  # "Practitioner/12"
    member_type: str  # Practitioner | RelatedPerson | Patient
    roles: frozenset[str] = frozenset()  # participant.role codes, "system|code"
    # The last moment (Unix seconds) the membership covers; None: no end in sight.
    until: float | None = None

    def current(self, now: float) -> bool:
        return self.until is None or now <= self.until


@attr.s(frozen=True, auto_attribs=True)
class TeamMembership:
    team: str  # "CareTeam/12"
    status: str
    # By Matrix user id. Use `is_member`/`current_members`: an entry may have ended since.
    members: Mapping[str, Member]
    # Participants whose person is marked inactive (they are not members).
    inactive: frozenset[str] = frozenset()
    # Current participants (persons, "Practitioner/12") with no Matrix account: who an
    # email invitation may reach (identity.invite_by_email).
    without_account: frozenset[str] = frozenset()
    subject: str | None = None  # "Patient/<id>", the team's patient
    name: str | None = None  # CareTeam.name (room names; never the patient's)
    # Whether the CareTeam's own period covers the moment it was resolved.
    in_period: bool = True
    # The next moment (Unix seconds) at which any period of the team starts or ends.
    next_change: float | None = None

    @property
    def admits_members(self) -> bool:
        return _admits(self.status) and self.in_period

    def is_member(self, user_id: str, now: float | None = None) -> bool:
        member = self.members.get(user_id)
        return member is not None and member.current(time.time() if now is None else now)

    def current_members(self, now: float | None = None) -> dict[str, Member]:
        moment = time.time() if now is None else now
        return {user_id: m for user_id, m in self.members.items() if m.current(moment)}


class _Walk:
    """What one resolution gathers on its way through the team's graph."""

    def __init__(self, resources: Resources, now: datetime, accounts_of: AccountsOf) -> None:
        self.resources = resources
        self.now = now
        self.accounts_of = accounts_of
        self.found: dict[str, Member] = {}
        self.claimed_by: dict[str, set[str]] = {}
        self.inactive: set[str] = set()
        self.without_account: set[str] = set()
        self.next_change: datetime | None = None

    def resource(self, reference: str) -> Mapping[str, Any] | None:
        """The resource read for ``reference``; None when absent or not a JSON object
        (what another FHIR server sent may be anything)."""
        found = self.resources.get(reference)
        return found if isinstance(found, Mapping) else None

    def covers(self, period: Any, until: datetime | None) -> tuple[bool, datetime | None]:
        """Whether ``period`` covers now, and the end of coverage given the end so far.
        Notes every start or end still to come."""
        bounds = period_bounds(period)
        if bounds is None:
            return False, until  # unreadable: fail closed
        start, end = bounds
        for moment in (start, end):
            if moment is not None and moment >= self.now:
                if self.next_change is None or moment < self.next_change:
                    self.next_change = moment
        if (start is not None and self.now < start) or (end is not None and self.now > end):
            return False, until
        return True, _earlier(until, end)


def resolve_membership(
    team_ref: str,
    resources: Resources,
    now: datetime,
    accounts_of: AccountsOf = explicit_accounts,
) -> TeamMembership:
    """The current members of ``team_ref`` (which must be in ``resources``); a person's
    accounts are what ``accounts_of`` says (the person directory's one resolution)."""
    walk = _Walk(resources, now, accounts_of)
    team = walk.resource(team_ref) or {}  # (not a JSON object: a team that admits nobody)
    in_period, until = walk.covers(team.get("period"), None)
    if in_period:
        _collect(team_ref, walk, until, visiting=set(), depth=0)
    for user_id, persons in walk.claimed_by.items():
        if len(persons) > 1:
            # Two people claiming one account is a data error: admit neither.
            logger.warning(
                "%s: one Matrix account is named by %d persons (%s); treating it as unmapped",
                team_ref,
                len(persons),
                ", ".join(sorted(persons)),
            )
            walk.found.pop(user_id, None)
    return TeamMembership(
        team=team_ref,
        status=team["status"] if isinstance(team.get("status"), str) else "unknown",
        members=walk.found,
        inactive=frozenset(walk.inactive - walk.found.keys()),
        without_account=frozenset(walk.without_account),
        subject=reference_of(team.get("subject")),
        name=team["name"] if isinstance(team.get("name"), str) else None,
        in_period=in_period,
        next_change=walk.next_change.timestamp() if walk.next_change else None,
    )


def _collect(
    team_ref: str,
    walk: _Walk,
    until: datetime | None,
    *,
    visiting: set[str],
    depth: int,
) -> None:
    if team_ref in visiting or depth > MAX_NESTING:
        return  # a cycle, or nesting deeper than any real care network
    team = walk.resource(team_ref)
    if team is None:
        return
    if depth > 0:
        if not _admits(team.get("status")):
            return  # an inactive nested team lends nobody to the outer team
        covered, until = walk.covers(team.get("period"), until)
        if not covered:
            return
    visiting = visiting | {team_ref}
    for participant in dicts_in(team.get("participant")):
        covered, participant_until = walk.covers(participant.get("period"), until)
        if not covered:
            continue
        member_ref = reference_of(participant.get("member"))
        if member_ref is None:
            continue
        roles = _role_codes(participant)
        member_type = member_ref.split("/", 1)[0]
        if member_type == "CareTeam":
            _collect(member_ref, walk, participant_until, visiting=visiting, depth=depth + 1)
        elif member_type == "PractitionerRole":
            role = walk.resource(member_ref)
            if role is None or not is_active(role):
                continue
            covered, role_until = walk.covers(role.get("period"), participant_until)
            practitioner_ref = reference_of(role.get("practitioner"))
            if covered and practitioner_ref and practitioner_ref.startswith("Practitioner/"):
                _add_person(practitioner_ref, walk, roles, role_until)
        elif member_type in PERSON_TYPES:
            _add_person(member_ref, walk, roles, participant_until)


def _add_person(
    person_ref: str, walk: _Walk, roles: frozenset[str], until: datetime | None
) -> None:
    person = walk.resource(person_ref)
    if person is None:
        return
    accounts = walk.accounts_of(person_ref, person)
    if not is_active(person):
        walk.inactive.update(accounts)
        return
    if not accounts:
        walk.without_account.add(person_ref)
        return
    # Interned: the same people sit in many teams, and every cached answer would otherwise
    # hold its own copies of their ids (measured by bench/scale).
    member_type = sys.intern(person_ref.split("/", 1)[0])
    person_ref = sys.intern(person_ref)
    roles = frozenset(map(sys.intern, roles)) if roles else NO_ROLES
    ends = until.timestamp() if until is not None else None
    for user_id in map(sys.intern, sorted(accounts)):
        walk.claimed_by.setdefault(user_id, set()).add(person_ref)
        # (Per account: another person met earlier under one of this person's accounts
        # must not change what the next account is credited to.)
        member = Member(user_id, person_ref, member_type, roles, ends)
        earlier = walk.found.get(user_id)
        if earlier is not None:
            merged_roles = roles | earlier.roles
            # Reached by several paths: a member for as long as any of them lasts.
            last = None if ends is None or earlier.until is None else max(ends, earlier.until)
            if TYPE_PRECEDENCE.index(earlier.member_type) < TYPE_PRECEDENCE.index(member_type):
                member = Member(user_id, earlier.person, earlier.member_type, merged_roles, last)
            else:
                member = Member(user_id, person_ref, member_type, merged_roles, last)
        walk.found[user_id] = member


def _admits(status: Any) -> bool:
    return isinstance(status, str) and status in ADMITTING_STATUSES


def _earlier(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _role_codes(participant: Mapping[str, Any]) -> frozenset[str]:
    codes = set()
    for concept in dicts_in(participant.get("role")):
        for coding in dicts_in(concept.get("coding")):
            if coding.get("code"):
                codes.add(f"{coding.get('system', '')}|{coding['code']}")
    return frozenset(codes)
