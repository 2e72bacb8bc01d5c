"""Care-team gating: who may be invited to, join, or act in a care-team room.

The spam-checker callbacks give local users an early, friendly answer; the
``check_event_allowed`` rule is the complete one — it also sees what server admins
and room creators do (spam checkers skip them) and events arriving over federation.
Every "no" is a ``Denied`` carrying its reason (DESIGN §5).
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

from synapse.module_api import NOT_SPAM, EventBase, StateMap

from synapse_fhir_module.care_team import TeamMembership
from synapse_fhir_module.denials import Denied, Reason
from synapse_fhir_module.room_bindings import RoomBindings
from synapse_fhir_module.team_directory import CareTeamDirectory, DirectoryUnavailable

logger = logging.getLogger(__name__)

PROTECTED_PREFIX = "org.synapse_fhir."
ENTERING = frozenset({"invite", "join", "knock"})


class CareTeamGate:
    def __init__(
        self,
        bindings: RoomBindings,
        teams: CareTeamDirectory,
        *,
        service_user_id: str,
        exempt_users: Collection[str],
        fail_closed: bool,
    ) -> None:
        self._bindings = bindings
        self._teams = teams
        self._service_user_id = service_user_id
        self._exempt = frozenset(exempt_users) | {service_user_id}
        self._fail_closed = fail_closed

    async def user_may_invite(self, inviter: str, invitee: str, room_id: str) -> str:
        await self._check_entry(room_id, entering=invitee, inviter=inviter)
        return NOT_SPAM

    async def user_may_join_room(self, user_id: str, room_id: str, is_invited: bool) -> str:
        await self._check_entry(room_id, entering=user_id)
        return NOT_SPAM

    async def user_may_create_room(self, user_id: str, room_config: dict[str, Any]) -> str:
        """Nobody but the service user may create a room pre-bound to the care record."""
        if user_id != self._service_user_id:
            for state in room_config.get("initial_state") or []:
                if isinstance(state, dict) and str(state.get("type", "")).startswith(
                    PROTECTED_PREFIX
                ):
                    raise Denied(Reason.PROTECTED_STATE)
        return NOT_SPAM

    async def check_event_for_spam(self, event: EventBase) -> str:
        """A person who left the care team may not keep acting in its rooms (leaving is fine)."""
        if event.type != "m.room.member" and event.sender not in self._exempt:
            team = await self._membership_of_room(event.room_id)
            if team is not None and not team.is_member(event.sender):
                raise Denied(Reason.NOT_IN_CARE_TEAM)
        return NOT_SPAM

    async def check_event_allowed(
        self, event: EventBase, state_events: StateMap[EventBase]
    ) -> tuple[bool, dict | None]:
        if event.is_state() and event.type.startswith(PROTECTED_PREFIX):
            if event.sender != self._service_user_id:
                raise Denied(Reason.PROTECTED_STATE)
            return True, None
        if event.type != "m.room.member" or event.content.get("membership") not in ENTERING:
            return True, None
        target = event.state_key
        if _is_profile_change(event, state_events):
            return True, None
        membership = event.content["membership"]
        inviter = event.sender if membership == "invite" else None
        await self._check_entry(event.room_id, entering=target, inviter=inviter)
        return True, None

    async def _check_entry(
        self, room_id: str, *, entering: str, inviter: str | None = None
    ) -> None:
        if entering in self._exempt and (inviter is None or inviter in self._exempt):
            return
        team = await self._membership_of_room(room_id)
        if team is None:
            return
        if inviter is not None and inviter not in self._exempt and not team.is_member(inviter):
            raise Denied(Reason.INVITER_NOT_IN_CARE_TEAM)
        if entering in self._exempt:
            return
        if not team.admits_members:
            raise Denied(Reason.CARE_TEAM_INACTIVE)
        if not team.is_member(entering):
            raise Denied(Reason.NOT_IN_CARE_TEAM)

    async def _membership_of_room(self, room_id: str) -> TeamMembership | None:
        """The room's team, None for an ordinary room; Denied when FHIR can't tell."""
        try:
            team_ref = await self._bindings.care_team_of(room_id)
            if team_ref is None:
                return None
            return await self._teams.membership(team_ref)
        except DirectoryUnavailable as e:
            if self._fail_closed:
                logger.warning("Denying in %s: care team directory unavailable (%s)", room_id, e)
                raise Denied(Reason.DIRECTORY_UNAVAILABLE) from None
            logger.warning("Allowing in %s without a care team check (fail_open): %s", room_id, e)
            return None


def _is_profile_change(event: EventBase, state_events: StateMap[EventBase]) -> bool:
    """A joined member changing display name or avatar re-sends `join`: not an entry."""
    if event.content.get("membership") != "join":
        return False
    previous = state_events.get(("m.room.member", event.state_key))
    return previous is not None and previous.content.get("membership") == "join"
