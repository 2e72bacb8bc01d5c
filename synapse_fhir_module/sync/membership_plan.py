"""Who to invite into, and remove from, a care-team room so it matches FHIR (pure).

The input is what FHIR says (the members, whether the team admits anyone new) and what
the room holds (each user's current membership); the output is the Matrix actions. A
removed user is kicked (or their invite withdrawn); a banned user FHIR admits again is
unbanned before the invite.

``room_target`` says who FHIR wants in a room (its teams and its thread's mode combined):
the sync acts on it, the operator console shows it next to the room's members.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import attr

from synapse_fhir_module.fhir.care_team import Member, TeamMembership
from synapse_fhir_module.mapping.thread_status import ThreadMode, room_rules

# Memberships that give (or are about to give) a user the room.
PRESENT = frozenset({"join", "invite", "knock"})
# Team statuses under which the team's rooms are emptied (design.md: entered-in-error, deleted).
EMPTIED_STATUSES = frozenset({"entered-in-error", "missing"})


@attr.s(frozen=True, auto_attribs=True)
class MembershipPlan:
    unban: tuple[str, ...] = ()
    invite: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.unban or self.invite or self.remove)


def plan_membership(
    members: Collection[str],
    current: Mapping[str, str],
    *,
    keep: Collection[str],
    admit_new: bool,
    invitable: Collection[str] | None = None,
) -> MembershipPlan:
    """``current``: user id → membership in the room now; ``keep``: never removed (the
    service user, exempt users); ``admit_new``: False while the team is not active;
    ``invitable``: the members who may be invited (default: all; in a room several teams
    share, the members of those that admit anyone new)."""
    present = {user for user, membership in current.items() if membership in PRESENT}
    remove = sorted(present - set(members) - set(keep))
    if not admit_new:
        return MembershipPlan(remove=tuple(remove))
    invite = sorted(set(members if invitable is None else set(members) & set(invitable)) - present)
    unban = [user for user in invite if current.get(user) == "ban"]
    return MembershipPlan(unban=tuple(unban), invite=tuple(invite), remove=tuple(remove))


@attr.s(frozen=True, auto_attribs=True)
class RoomTarget:
    """Who FHIR wants in a room now."""

    # The members of its teams (the first team listing a user gives their level).
    members: Mapping[str, Member]
    # Of them, who may be invited now (members of teams that admit anyone new).
    invitable: frozenset[str]
    # Some team keeps its members (not every team emptied the room).
    kept: bool
    # No team (nor the thread) makes the room read-only.
    writable: bool


def room_target(
    teams: Sequence[TeamMembership], mode: ThreadMode = ThreadMode.OPEN, now: float | None = None
) -> RoomTarget:
    """A room's teams (one, or several for a thread addressed to several: their union)
    and its thread's mode, combined: the stricter rule of each team and the thread wins."""
    members: dict[str, Member] = {}
    invitable: set[str] = set()
    writable = True
    kept = False
    for team in teams:
        rules = room_rules(
            team_admits=team.admits_members,
            team_emptied=team.status in EMPTIED_STATUSES,
            mode=mode,
        )
        if rules.emptied:
            continue  # its members go, unless another of the room's teams lists them
        kept = True
        current = team.current_members(now)
        for user_id, member in current.items():
            members.setdefault(user_id, member)
        if rules.admit_new:
            invitable |= set(current)
        # The stricter wins: one team closed makes the shared room read-only.
        writable = writable and not rules.read_only
    return RoomTarget(members, frozenset(invitable), kept, writable)
