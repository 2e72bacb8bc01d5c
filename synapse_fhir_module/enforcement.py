"""Care-team gating: who may be invited to, join, or act in a care-team room.

- Local users get early, friendly answers from the spam-checker callbacks.
- ``check_event_allowed`` checks every invite/join/knock this server builds: also those
  of server admins and room creators (which spam checkers skip), and a remote server's
  ``/make_join`` and ``/make_knock``.
- Events that arrive over federation are *not* given to ``check_event_allowed`` by
  Synapse (1.163): a server already in the room builds its users' joins itself. Synapse
  does run ``check_event_for_spam`` on every received event, so there a refused entry
  is soft-failed (it never becomes room state here) and the service user removes the
  person, so the other server sees them leave too.

Every "no" to a local user is a ``Denied`` carrying its reason (DESIGN §5).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import Any

from synapse.module_api import NOT_SPAM, EventBase, StateMap
from synapse.module_api.errors import Codes

from synapse_fhir_module.care_team import TeamMembership
from synapse_fhir_module.denials import Denied, Reason
from synapse_fhir_module.room_bindings import RoomBindings
from synapse_fhir_module.team_directory import CareTeamDirectory, DirectoryUnavailable

logger = logging.getLogger(__name__)

PROTECTED_PREFIX = "org.synapse_fhir."
ENTERING = frozenset({"invite", "join", "knock"})

# remove_member_soon(room_id, user_id): have the service user take someone out of a
# care-team room, in the background.
RemoveMember = Callable[[str, str], None]


class CareTeamGate:
    def __init__(
        self,
        bindings: RoomBindings,
        teams: CareTeamDirectory,
        *,
        service_user_id: str,
        exempt_users: Collection[str],
        fail_closed: bool,
        is_local: Callable[[str], bool],
        remove_member_soon: RemoveMember,
    ) -> None:
        self._bindings = bindings
        self._teams = teams
        self._service_user_id = service_user_id
        self._exempt = frozenset(exempt_users) | {service_user_id}
        self._fail_closed = fail_closed
        self._is_local = is_local
        self._remove_member_soon = remove_member_soon

    async def user_may_invite(self, inviter: str, invitee: str, room_id: str) -> str:
        _raise_if(await self._entry_refusal(room_id, entering=invitee, inviter=inviter))
        return NOT_SPAM

    async def user_may_join_room(self, user_id: str, room_id: str, is_invited: bool) -> str:
        _raise_if(await self._entry_refusal(room_id, entering=user_id))
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

    async def check_event_for_spam(self, event: EventBase) -> str | Codes:
        """Local senders: someone who left the care team may not keep acting in its rooms
        (leaving is fine). Received over federation: the same, and entries too."""
        if event.sender in self._exempt or event.type.startswith(PROTECTED_PREFIX):
            return NOT_SPAM  # protected state is check_event_allowed's job
        if event.type == "m.room.member":
            # Synapse hands local membership events to check_event_allowed, not here.
            if self._is_local(event.sender) or not _is_entry(event):
                return NOT_SPAM
            reason = await self._entry_refusal(
                event.room_id,
                entering=event.state_key,
                inviter=event.sender if event.content["membership"] == "invite" else None,
            )
        else:
            reason = await self._acting_refusal(event.room_id, event.sender)
        if reason is None:
            return NOT_SPAM
        if self._is_local(event.sender):
            raise Denied(reason)
        return self._refuse_received(event, reason)

    async def check_event_allowed(
        self, event: EventBase, state_events: StateMap[EventBase]
    ) -> tuple[bool, dict | None]:
        if event.is_state() and event.type.startswith(PROTECTED_PREFIX):
            if event.sender != self._service_user_id:
                raise Denied(Reason.PROTECTED_STATE)
            return True, None
        if not _is_entry(event) or _is_profile_change(event, state_events):
            return True, None
        inviter = event.sender if event.content["membership"] == "invite" else None
        _raise_if(
            await self._entry_refusal(event.room_id, entering=event.state_key, inviter=inviter)
        )
        return True, None

    async def _entry_refusal(
        self, room_id: str, *, entering: str, inviter: str | None = None
    ) -> Reason | None:
        if entering in self._exempt and (inviter is None or inviter in self._exempt):
            return None
        team, unavailable = await self._team_of_room(room_id)
        if team is None:
            return unavailable
        if inviter is not None and inviter not in self._exempt and not team.is_member(inviter):
            return Reason.INVITER_NOT_IN_CARE_TEAM
        if entering in self._exempt:
            return None
        if not team.admits_members:
            return Reason.CARE_TEAM_INACTIVE
        if not team.is_member(entering):
            return Reason.NOT_IN_CARE_TEAM
        return None

    async def _acting_refusal(self, room_id: str, sender: str) -> Reason | None:
        team, unavailable = await self._team_of_room(room_id)
        if team is None:
            return unavailable
        return None if team.is_member(sender) else Reason.NOT_IN_CARE_TEAM

    async def _team_of_room(self, room_id: str) -> tuple[TeamMembership | None, Reason | None]:
        """(the room's team, None); (None, None) for an ordinary room; and when FHIR
        can't tell: (None, DIRECTORY_UNAVAILABLE) failing closed, (None, None) failing open."""
        try:
            team_ref = await self._bindings.care_team_of(room_id)
            if team_ref is None:
                return None, None
            return await self._teams.membership(team_ref), None
        except DirectoryUnavailable as e:
            if self._fail_closed:
                logger.warning("Refusing in %s: care team directory unavailable (%s)", room_id, e)
                return None, Reason.DIRECTORY_UNAVAILABLE
            logger.warning("Allowing in %s without a care team check (fail_open): %s", room_id, e)
            return None, None

    def _refuse_received(self, event: EventBase, reason: Reason) -> Codes:
        """Soft-fail an event from another server, and take its person out of the room."""
        logger.warning(
            "Refusing %s (%s) received over federation in %s: %s",
            event.event_id,
            event.type,
            event.room_id,
            reason.value,
        )
        if event.type == "m.room.member" and reason is not Reason.DIRECTORY_UNAVAILABLE:
            # Soft-failing keeps them out of this server's view; the removal tells theirs.
            self._remove_member_soon(event.room_id, event.state_key)
        return Codes.FORBIDDEN


def _raise_if(reason: Reason | None) -> None:
    if reason is not None:
        raise Denied(reason)


def _is_entry(event: EventBase) -> bool:
    return event.type == "m.room.member" and event.content.get("membership") in ENTERING


def _is_profile_change(event: EventBase, state_events: StateMap[EventBase]) -> bool:
    """A joined member changing display name or avatar re-sends `join`: not an entry."""
    if event.content.get("membership") != "join":
        return False
    previous = state_events.get(("m.room.member", event.state_key))
    return previous is not None and previous.content.get("membership") == "join"
