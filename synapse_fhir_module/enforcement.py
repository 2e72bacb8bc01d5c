"""Care-team gating: who may be invited to, join, or act in a care-team room.

- Local users get early, friendly answers from the spam-checker callbacks.
- ``check_event_allowed`` checks every invite/join/knock this server builds: also those
  of server admins and room creators (which spam checkers skip), and a remote server's
  ``/make_join`` and ``/make_knock``.
- Events that arrive over federation are *not* given to ``check_event_allowed`` by
  Synapse (1.163): a server already in the room builds its users' joins itself. Synapse
  does run ``check_event_for_spam`` on every received event, so there a refused event
  is soft-failed (it never becomes room state here), and someone who joined by
  themselves is banned by the service user, so their own server drops them too.
- What binds a room to the care record (``org.synapse_fhir.*`` state, the space links
  of a bound room, and redactions of those events) only the service user may change.

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
from synapse_fhir_module.room_bindings import SPACE_CHILD, SPACE_PARENT, RoomBindings
from synapse_fhir_module.team_directory import CareTeamDirectory, DirectoryUnavailable

logger = logging.getLogger(__name__)

PROTECTED_PREFIX = "org.synapse_fhir."
ENTERING = frozenset({"invite", "join", "knock"})
SPACE_LINKS = frozenset({SPACE_PARENT, SPACE_CHILD})

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
        forbid_encryption: bool = False,
    ) -> None:
        self._bindings = bindings
        self._teams = teams
        self._service_user_id = service_user_id
        self._exempt = frozenset(exempt_users) | {service_user_id}
        self._fail_closed = fail_closed
        self._is_local = is_local
        self._remove_member_soon = remove_member_soon
        self._forbid_encryption = forbid_encryption

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
        """A person not (or no longer) in the care team may not act in its rooms.

        Local senders get a Denied (their client shows it). Events received over
        federation are soft-failed instead (returning a code): they never become room
        state here. For those, only a definite "no" counts — an unreachable directory
        lets them through, since a soft-failed event is stripped for good.
        """
        if event.sender in self._exempt:
            return NOT_SPAM
        if self._is_local(event.sender):
            # Local membership and state changes are check_event_allowed's job.
            if event.type == "m.room.member" or event.is_state():
                return NOT_SPAM
            _raise_if(await self._acting_refusal(event.room_id, event.sender))
            return NOT_SPAM
        reason = await self._received_refusal(event)
        if reason is None or reason is Reason.DIRECTORY_UNAVAILABLE:
            return NOT_SPAM
        logger.warning(
            "Refusing %s (%s) received over federation in %s: %s",
            event.event_id,
            event.type,
            event.room_id,
            reason.value,
        )
        if (
            reason is Reason.NOT_IN_CARE_TEAM
            and _is_entry(event)
            and event.state_key == event.sender
        ):
            # Soft-failing keeps them out of this server's view; the ban tells theirs.
            self._remove_member_soon(event.room_id, event.sender)
        return Codes.FORBIDDEN

    async def check_event_allowed(
        self, event: EventBase, state_events: StateMap[EventBase]
    ) -> tuple[bool, dict | None]:
        _raise_if(await self._protected_change_refusal(event))
        if not _is_entry(event) or _is_profile_change(event, state_events):
            return True, None
        inviter = event.sender if event.content["membership"] == "invite" else None
        _raise_if(
            await self._entry_refusal(event.room_id, entering=event.state_key, inviter=inviter)
        )
        return True, None

    async def _received_refusal(self, event: EventBase) -> Reason | None:
        protected = await self._protected_change_refusal(event)
        if protected is not None:
            return protected
        if event.type == "m.room.member":
            if not _is_entry(event):
                return None
            previous = await self._bindings.membership_of(event.room_id, event.state_key)
            if event.content["membership"] == "join" and previous == "join":
                return None  # a profile change
            inviter = event.sender if event.content["membership"] == "invite" else None
            return await self._entry_refusal(
                event.room_id, entering=event.state_key, inviter=inviter
            )
        return await self._acting_refusal(event.room_id, event.sender)

    async def _protected_change_refusal(self, event: EventBase) -> Reason | None:
        """Only the service user may change what binds a room to the care record."""
        if event.sender == self._service_user_id:
            return None
        if event.is_state() and event.type.startswith(PROTECTED_PREFIX):
            return Reason.PROTECTED_STATE
        if event.is_state() and event.type in SPACE_LINKS:
            if await self._is_bound(event.room_id):
                return Reason.PROTECTED_STATE
        if event.type == "m.room.encryption" and self._forbid_encryption:
            # communication.encrypted_rooms: forbid — the record must be able to read it.
            if await self._is_bound(event.room_id):
                return Reason.ENCRYPTION_FORBIDDEN
        if event.type == "m.room.redaction" and isinstance(event.redacts, str):
            if event.redacts in await self._bindings.binding_event_ids(
                event.room_id
            ) and await self._is_bound(event.room_id):
                return Reason.PROTECTED_STATE
        return None

    async def _is_bound(self, room_id: str) -> bool:
        try:
            return await self._bindings.care_team_of(room_id) is not None
        except DirectoryUnavailable:
            return True  # a thread-bound room whose request FHIR can't show right now

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
            if entering in team.inactive:
                return Reason.ACCOUNT_INACTIVE
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
