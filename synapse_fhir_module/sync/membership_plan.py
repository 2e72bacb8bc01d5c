"""Who to invite into, and remove from, a care-team room so it matches FHIR (pure).

The input is what FHIR says (the members, whether the team admits anyone new) and what
the room holds (each user's current membership); the output is the Matrix actions. A
removed user is kicked (or their invite withdrawn); a banned user FHIR admits again is
unbanned before the invite.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import attr

# Memberships that give (or are about to give) a user the room.
PRESENT = frozenset({"join", "invite", "knock"})


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
