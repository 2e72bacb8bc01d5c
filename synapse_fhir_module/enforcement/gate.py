"""Care-team gating: who may be invited to, join, or act in a care-team room.

- ``check_event_allowed`` sees every event this server builds — its users' messages,
  state, memberships, also those of server admins and room creators (which spam checkers
  skip), and the joins and knocks it builds for remote users (``/make_join``,
  ``/make_knock``). Entries need a current member (invited by one); anything else needs
  the sender to be a current member, except leaving.
- Events that arrive over federation are *not* given to ``check_event_allowed`` by
  Synapse (1.163; but for ``/send_knock``): a server already in the room builds its users'
  events itself. Synapse runs ``check_event_for_spam`` on received events whose content
  hash checks out, so there the same rules soft-fail a refused event (it does not become
  room state here), and someone who entered by themselves is banned by the service user,
  so their own server drops them too. (An event whose hash fails is redacted and skips
  the spam check: the power levels and the module's membership check in ``on_new_event``
  cover that.)
- What binds a room to the care record and decides who is in it (``org.synapse_fhir.*``,
  the space links, join rules, history visibility, encryption, tombstone, server ACL,
  power levels, canonical alias; redactions of binding events) only the service user may
  change. The rooms' power levels reserve the same (``power_levels.py``): these callbacks
  are the friendly answer, the power levels what state resolution obeys.
- Third-party (email) invites are refused in care-team rooms: members come from FHIR.

Every "no" to a local user is a ``Denied`` carrying its reason (design.md: endpoints), and
every refusal, local or received, is noted in the audit journal (``audit``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import Any

from synapse.module_api import NOT_SPAM, EventBase, StateMap
from synapse.module_api.errors import Codes

from synapse_fhir_module.audit.decision import DecisionKind, Outcome
from synapse_fhir_module.audit.journal import AuditJournal
from synapse_fhir_module.enforcement.denials import Denied, Reason
from synapse_fhir_module.enforcement.power_levels import RESERVED_EVENTS
from synapse_fhir_module.enforcement.room_bindings import RoomBindings
from synapse_fhir_module.fhir.care_team import TeamMembership
from synapse_fhir_module.fhir.team_directory import CareTeamDirectory, DirectoryUnavailable
from synapse_fhir_module.identity.registered_accounts import RegisteredAccounts

logger = logging.getLogger(__name__)

PROTECTED_PREFIX = "org.synapse_fhir."
ENTERING = frozenset({"invite", "join", "knock"})
ENCRYPTION = "m.room.encryption"
THIRD_PARTY_INVITE = "m.room.third_party_invite"
# Synapse's own filler event (it picks any joined local user to send it).
DUMMY_EVENT = "org.matrix.dummy_event"

# remove_member_soon(room_id, user_id): have the service user take someone out of a
# care-team room, in the background.
RemoveMember = Callable[[str, str], None]


class CareTeamGate:
    def __init__(
        self,
        bindings: RoomBindings,
        teams: CareTeamDirectory,
        *,
        accounts: RegisteredAccounts | None = None,
        service_user_id: str,
        exempt_users: Collection[str],
        fail_closed: bool,
        is_local: Callable[[str], bool],
        remove_member_soon: RemoveMember,
        forbid_encryption: bool = False,
        journal: AuditJournal | None = None,
    ) -> None:
        self._bindings = bindings
        self._teams = teams
        self._accounts = accounts
        self._service_user_id = service_user_id
        self._exempt = frozenset(exempt_users) | {service_user_id}
        self._fail_closed = fail_closed
        self._is_local = is_local
        self._remove_member_soon = remove_member_soon
        self._forbid_encryption = forbid_encryption
        self._journal = journal

    async def user_may_invite(self, inviter: str, invitee: str, room_id: str) -> str:
        reason = await self._entry_refusal(room_id, entering=invitee, inviter=inviter)
        self._refuse(reason, room_id, user_id=invitee, actor_id=inviter, attempt="invite")
        return NOT_SPAM

    async def user_may_join_room(self, user_id: str, room_id: str, is_invited: bool) -> str:
        reason = await self._entry_refusal(room_id, entering=user_id)
        self._refuse(reason, room_id, user_id=user_id, actor_id=user_id, attempt="join")
        return NOT_SPAM

    async def user_may_create_room(self, user_id: str, room_config: dict[str, Any]) -> str:
        """Nobody but the service user may create a room pre-bound to the care record."""
        if user_id != self._service_user_id:
            for state in room_config.get("initial_state") or []:
                if isinstance(state, dict) and str(state.get("type", "")).startswith(
                    PROTECTED_PREFIX
                ):
                    self._refuse(
                        Reason.PROTECTED_STATE,
                        None,
                        user_id=user_id,
                        actor_id=user_id,
                        attempt="create_room",
                    )
        return NOT_SPAM

    async def check_event_for_spam(self, event: EventBase) -> str | Codes:
        """Events received over federation: the rules ``check_event_allowed`` applies to
        events this server builds (local senders were checked there already).

        A refused event is soft-failed (returning a code): it never becomes room state
        here. An unreachable directory refuses an entry when failing closed, like any other
        refused entry; other events of a remote sender pass then (a soft-failed message is
        stripped for good, and the sender was let in by an earlier decision).
        """
        if event.sender in self._exempt or self._is_local(event.sender):
            return NOT_SPAM
        reason, entering = await self._received_refusal(event)
        if reason is None:
            return NOT_SPAM
        if reason is Reason.DIRECTORY_UNAVAILABLE and not (self._fail_closed and entering):
            return NOT_SPAM
        logger.warning(
            "Refusing %s (%s) received over federation in %s: %s",
            event.event_id,
            event.type,
            event.room_id,
            reason.value,
        )
        self._note_refusal(
            reason,
            event.room_id,
            user_id=event.state_key if entering else event.sender,
            actor_id=event.sender,
            attempt=f"federated_{_attempt(event)}",
        )
        if entering and event.state_key == event.sender:
            # Soft-failing keeps them out of this server's view; the ban tells theirs.
            # (The sync lifts the ban if FHIR admits them.) Someone already joined (a
            # profile change) is never banned for it.
            self._remove_member_soon(event.room_id, event.sender)
        return Codes.FORBIDDEN

    async def check_event_allowed(
        self, event: EventBase, state_events: StateMap[EventBase]
    ) -> tuple[bool, dict | None]:
        if event.type == ENCRYPTION and event.sender == self._service_user_id:
            if self._forbid_encryption:
                # Only the server's encryption default makes the service user send this
                # (it creates care-team rooms only): leave the room unencrypted.
                return True, _without_content(event)
            return True, None
        if _is_entry(event) and not _is_profile_change(event, state_events):
            inviter = event.sender if event.content["membership"] == "invite" else None
            reason = await self._entry_refusal(
                event.room_id, entering=event.state_key, inviter=inviter
            )
            self._refuse_event(reason, event, user_id=event.state_key)
            return True, None
        if self._is_local(event.sender) and not _is_free(event):
            # Someone who left the care team (or whose person is inactive) and is still
            # joined: nothing but leaving.
            self._refuse_event(await self._acting_refusal(event.room_id, event.sender), event)
        self._refuse_event(await self._protected_change_refusal(event), event)
        return True, None

    async def _received_refusal(self, event: EventBase) -> tuple[Reason | None, bool]:
        """Why a received event is refused (None: it is not), and whether it is someone
        entering the room (not a joined member's profile change)."""
        if _is_entry(event):
            previous = await self._bindings.membership_of(event.room_id, event.state_key)
            if event.content["membership"] == "join" and previous == "join":
                # A profile change: a current member's only.
                return await self._acting_refusal(event.room_id, event.sender), False
            inviter = event.sender if event.content["membership"] == "invite" else None
            reason = await self._entry_refusal(
                event.room_id, entering=event.state_key, inviter=inviter
            )
            return reason, True
        # Messages, state, and membership changes of others (kick, ban).
        acting = (
            None if _is_free(event) else await self._acting_refusal(event.room_id, event.sender)
        )
        if acting is not None and acting is not Reason.DIRECTORY_UNAVAILABLE:
            return acting, False
        # (What binds a room is refused even while the directory cannot tell.)
        return await self._protected_change_refusal(event) or acting, False

    async def _protected_change_refusal(self, event: EventBase) -> Reason | None:
        """Only the service user may change what binds a room to the care record and
        decides who is in it."""
        if event.sender == self._service_user_id:
            return None
        if event.is_state() and event.type.startswith(PROTECTED_PREFIX):
            return Reason.PROTECTED_STATE  # in any room: nobody may pre-bind one
        if event.type == THIRD_PARTY_INVITE:
            if await self._is_bound(event.room_id):
                return Reason.THIRD_PARTY_INVITE_FORBIDDEN
        elif event.is_state() and event.type in RESERVED_EVENTS:
            if await self._is_bound(event.room_id):
                if event.type == ENCRYPTION and self._forbid_encryption:
                    # communication.encrypted_rooms: forbid — the record must read it.
                    return Reason.ENCRYPTION_FORBIDDEN
                return Reason.PROTECTED_STATE
        elif event.type == "m.room.redaction" and isinstance(event.redacts, str):
            if event.redacts in await self._bindings.binding_event_ids(
                event.room_id
            ) and await self._is_bound(event.room_id):
                return Reason.PROTECTED_STATE
        return None

    def _refuse(
        self,
        reason: Reason | None,
        room_id: str | None,
        *,
        user_id: str,
        actor_id: str,
        attempt: str,
    ) -> None:
        """Say no (when there is a ``reason``), noting it in the audit journal first."""
        if reason is not None:
            self._note_refusal(reason, room_id, user_id=user_id, actor_id=actor_id, attempt=attempt)
            raise Denied(reason)

    def _refuse_event(
        self, reason: Reason | None, event: EventBase, *, user_id: str | None = None
    ) -> None:
        """``_refuse`` for an event: what it tried is worked out only when it is refused
        (this runs for every event Synapse builds)."""
        if reason is not None:
            self._refuse(
                reason,
                event.room_id,
                user_id=user_id or event.sender,
                actor_id=event.sender,
                attempt=_attempt(event),
            )

    def _note_refusal(
        self, reason: Reason, room_id: str | None, *, user_id: str, actor_id: str, attempt: str
    ) -> None:
        if self._journal is None:
            return
        remembered = self._bindings.remembered(room_id) if room_id else None
        self._journal.note(
            DecisionKind.ACCESS_REFUSED,
            Outcome.REFUSED,
            user_id=user_id,
            actor_id=actor_id,
            room_id=room_id,
            care_team=remembered[0] if remembered else None,
            reason=reason.value,
            detail=attempt,
        )

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
        teams, unavailable = await self._teams_of_room(room_id)
        if not teams:
            return unavailable
        if (
            inviter is not None
            and inviter not in self._exempt
            and not any(team.is_member(inviter) for team in teams)
        ):
            return Reason.INVITER_NOT_IN_CARE_TEAM
        if entering in self._exempt:
            return None
        team = _deciding_team(teams, entering)
        if not team.admits_members:
            return Reason.CARE_TEAM_INACTIVE
        if not team.is_member(entering):
            if entering in team.inactive:
                return Reason.ACCOUNT_INACTIVE
            return Reason.NOT_IN_CARE_TEAM
        if await self._conflicting(team, entering):
            return Reason.NOT_IN_CARE_TEAM
        return None

    async def _conflicting(self, team: TeamMembership, user_id: str) -> bool:
        """Whether the member's account was registered as somebody else's (its name taken
        before a record came to name it): then it is nobody's, and stays out."""
        if self._accounts is None:
            return False
        person = team.members[user_id].person
        if await self._accounts.conflicting({user_id: person}):
            logger.warning("%s names an account registered as another person's: refused", person)
            return True
        return False

    async def _acting_refusal(self, room_id: str, sender: str) -> Reason | None:
        if sender in self._exempt:
            return None
        teams, unavailable = await self._teams_of_room(room_id)
        if not teams:
            return unavailable
        if any(team.is_member(sender) for team in teams):
            return None
        if any(sender in team.inactive for team in teams):
            return Reason.ACCOUNT_INACTIVE
        return Reason.NOT_IN_CARE_TEAM

    async def _teams_of_room(self, room_id: str) -> tuple[list[TeamMembership], Reason | None]:
        """(the room's teams, None) — several for a thread addressed to several teams, whose
        members all share it; ([], None) for an ordinary room; and when FHIR can't tell:
        ([], DIRECTORY_UNAVAILABLE) failing closed, ([], None) failing open."""
        try:
            team_refs = await self._bindings.care_teams_of(room_id)
            return [await self._teams.membership(team_ref) for team_ref in team_refs], None
        except DirectoryUnavailable as e:
            if self._fail_closed:
                logger.warning("Refusing in %s: care team directory unavailable (%s)", room_id, e)
                return [], Reason.DIRECTORY_UNAVAILABLE
            logger.warning("Allowing in %s without a care team check (fail_open): %s", room_id, e)
            return [], None


def _deciding_team(teams: list[TeamMembership], user_id: str) -> TeamMembership:
    """The team whose rules decide about ``user_id`` in a room several teams share: one
    that lists them and admits members, else one that lists them, else the room's first."""
    listing = [team for team in teams if team.is_member(user_id)]
    admitting = [team for team in listing if team.admits_members]
    return (admitting or listing or teams)[0]


# Memberships the audit journal names; any other value (a received event may carry
# anything) is noted as "membership".
_MEMBERSHIPS = frozenset({"join", "invite", "knock", "leave", "ban"})


def _attempt(event: EventBase) -> str:
    """What an event tried, for the audit journal, from a fixed set of codes: a
    membership, a state change, a redaction or a message (never its content)."""
    if event.type == "m.room.member":
        membership = event.content.get("membership")
        return membership if membership in _MEMBERSHIPS else "membership"
    if event.type == "m.room.redaction":
        return "redact"
    return "state" if event.is_state() else "send"


def _is_entry(event: EventBase) -> bool:
    return event.type == "m.room.member" and event.content.get("membership") in ENTERING


def _is_free(event: EventBase) -> bool:
    """What anyone may do in a care-team room: leave it (and Synapse's empty filler event,
    which it sends as any joined local user)."""
    if event.type == DUMMY_EVENT:
        return not event.is_state() and not event.content
    return _is_own_leave(event)


def _is_own_leave(event: EventBase) -> bool:
    return (
        event.type == "m.room.member"
        and event.content.get("membership") == "leave"
        and event.state_key == event.sender
    )


def _without_content(event: EventBase) -> dict[str, Any]:
    """The event as Synapse rebuilds it from a third-party rule, with empty content."""
    return {
        "type": event.type,
        "room_id": event.room_id,
        "sender": event.sender,
        "state_key": event.state_key,
        "content": {},
    }


def _is_profile_change(event: EventBase, state_events: StateMap[EventBase]) -> bool:
    """A joined member changing display name or avatar re-sends `join`: not an entry."""
    if event.content.get("membership") != "join":
        return False
    previous = state_events.get(("m.room.member", event.state_key))
    return previous is not None and previous.content.get("membership") == "join"
