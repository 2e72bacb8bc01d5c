"""Matrix actions of the FHIR → Matrix sync, done as the service user through ModuleApi:
make a care team's space and a thread's room, bring their members in line with a plan,
set power levels, repair binding state, post a message.

A Matrix action that fails (a remote server away, a room shut down) is counted and
reported to the caller, which tries the whole sync again later: it is never dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from typing import Any

import attr
from synapse.module_api import ModuleApi

from synapse_fhir_module.audit.decision import DecisionKind, Outcome
from synapse_fhir_module.audit.journal import AuditJournal
from synapse_fhir_module.config import SyncConfig
from synapse_fhir_module.enforcement.binding_state import (
    BINDING_STATE_TYPES,
    CARE_TEAM_STATE,
    SPACE_CHILD,
    SPACE_PARENT,
    THREAD_STATE,
    Content,
    StateKey,
)
from synapse_fhir_module.enforcement.power_levels import creation_levels, power_levels_content
from synapse_fhir_module.fhir.care_team import Member
from synapse_fhir_module.mapping.relay_content import clean_text
from synapse_fhir_module.sync.membership_plan import MembershipPlan
from synapse_fhir_module.sync.metrics import MATRIX_ACTIONS_FAILED

logger = logging.getLogger(__name__)

# The spec's bound on a room name (m.room.name), in bytes of UTF-8.
ROOM_NAME_BYTES = 255
ELLIPSIS = "…"

POWER_LEVELS = "m.room.power_levels"
# Room versions whose creators hold unlimited power and must not be listed in power levels
# (MSC4289: room version 12 and its unstable predecessor).
CREATORS_PRIVILEGED = frozenset({"12", "org.matrix.hydra.11"})
# Said to whoever is removed: the rule, never the patient.
REMOVAL_REASON = "No longer a member of this care team in the care record"
# A membership change made, as the audit trail names it.
AUDITED_ACTIONS = {
    "invite": DecisionKind.MEMBER_INVITED,
    "remove": DecisionKind.MEMBER_REMOVED,
    "unban": DecisionKind.MEMBER_UNBANNED,
}


class MatrixActionsFailed(Exception):
    """Some of a room's membership changes failed (the others were made)."""

    def __init__(self, room_id: str, failed: list[str]) -> None:
        super().__init__(f"{len(failed)} action(s) failed in {room_id}: {', '.join(failed)}")
        self.failed = failed


class CareRooms:
    def __init__(
        self,
        api: ModuleApi,
        config: SyncConfig,
        *,
        service_user_id: str,
        exempt_users: Collection[str],
        journal: AuditJournal | None = None,
    ) -> None:
        self._api = api
        self._config = config
        self._service_user_id = service_user_id
        self._exempt_users = frozenset(exempt_users)
        # Each change made is noted for the audit trail (none when None: tests, tools).
        self._journal = journal

    async def create_space(self, team_ref: str, name: str) -> str:
        room_id, _ = await self._api.create_room(
            self._service_user_id,
            {
                "creation_content": {"type": "m.space"},
                "name": fitting_name(name),
                "preset": "private_chat",
                "visibility": "private",
                "power_level_content_override": creation_levels(),
                "initial_state": [_state(CARE_TEAM_STATE, "", {"reference": team_ref})],
            },
            ratelimit=False,
        )
        return room_id

    async def create_thread_room(self, space_id: str, thread_ref: str) -> str:
        """A room bound to the thread and pointing at the space (the space lists it in
        ``link_to_space``; that listing is what binds it to the team, design.md: mapping)."""
        room_id, _ = await self._api.create_room(
            self._service_user_id,
            {
                "preset": "private_chat",
                "visibility": "private",
                "power_level_content_override": creation_levels(),
                "initial_state": [
                    _state(THREAD_STATE, "", {"reference": thread_ref}),
                    _state(
                        SPACE_PARENT,
                        space_id,
                        {"via": [self._api.server_name], "canonical": True},
                    ),
                ],
            },
            ratelimit=False,
        )
        return room_id

    async def name_room(self, room_id: str, name: str) -> None:
        await self.send_state(room_id, "m.room.name", "", {"name": fitting_name(name)})

    async def link_to_space(self, space_id: str, room_id: str) -> None:
        """The space lists the room (once: nothing is sent when it already does)."""
        if room_id not in await self.rooms_of_space(space_id):
            await self.send_state(space_id, SPACE_CHILD, room_id, {"via": [self._api.server_name]})

    async def unlink_from_space(self, space_id: str, room_id: str) -> None:
        """The space no longer lists the room (nothing is sent when it does not)."""
        if room_id in await self.rooms_of_space(space_id):
            await self.send_state(space_id, SPACE_CHILD, room_id, {})

    async def rooms_of_space(self, space_id: str) -> list[str]:
        """The rooms the service user listed in the space."""
        state = await self._api.get_room_state(space_id, [(SPACE_CHILD, None)])
        return sorted(
            state_key
            for (_, state_key), event in state.items()
            if event.sender == self._service_user_id and event.content.get("via")
        )

    async def memberships(self, room_id: str) -> dict[str, str]:
        state = await self._api.get_room_state(room_id, [("m.room.member", None)])
        return {
            state_key: str(event.content.get("membership"))
            for (_, state_key), event in state.items()
        }

    async def binding_state(self, room_id: str) -> dict[StateKey, Content]:
        """The room's binding state events (type, state key) → content."""
        state = await self._api.get_room_state(
            room_id, [(event_type, None) for event_type in sorted(BINDING_STATE_TYPES)]
        )
        return {key: event.content for key, event in state.items()}

    async def apply_plan(
        self,
        room_id: str,
        plan: MembershipPlan,
        *,
        care_team: str | None = None,
        request: str | None = None,
    ) -> None:
        """Each action on its own: one refused invite must not stop the rest. Raises
        MatrixActionsFailed afterwards if any failed. (``care_team``, ``request``: whose
        room this is, for the audit trail.)"""
        failed: list[str] = []
        about = Audited(room_id, care_team, request)
        for user_id in plan.unban:
            # (Lifting a ban is a leave.)
            await self._membership(about, user_id, "leave", None, "unban", failed)
        for user_id in plan.invite:
            await self._membership(about, user_id, "invite", None, "invite", failed)
        for user_id in plan.remove:
            await self._membership(
                about, user_id, "leave", {"reason": REMOVAL_REASON}, "remove", failed
            )
        if failed:
            raise MatrixActionsFailed(room_id, failed)

    async def set_power_levels(
        self,
        room_id: str,
        members: Collection[Member],
        *,
        read_only: bool,
        care_team: str | None = None,
        request: str | None = None,
    ) -> None:
        state = await self._api.get_room_state(room_id, [(POWER_LEVELS, ""), ("m.room.create", "")])
        current_event = state.get((POWER_LEVELS, ""))
        current = dict(current_event.content) if current_event else {}
        users = current.get("users")
        keep = {
            user: level
            for user, level in (users.items() if isinstance(users, Mapping) else [])
            if user in self._exempt_users and isinstance(level, int)
        }
        content = power_levels_content(
            current,
            members,
            service_user=self._service_user_id,
            creators=_privileged_creators(state.get(("m.room.create", ""))),
            keep=keep,
            by_type=self._config.power_levels,
            by_role=self._config.role_power_levels,
            read_only=read_only,
        )
        if content != current:
            await self.send_state(room_id, POWER_LEVELS, "", content)
            self.note(
                DecisionKind.POWER_LEVELS_SET,
                Audited(room_id, care_team, request),
                detail="read_only" if read_only else None,
            )

    def note(
        self,
        kind: DecisionKind,
        about: Audited,
        *,
        user_id: str | None = None,
        detail: str | None = None,
    ) -> None:
        """A change the service user made, for the audit trail."""
        if self._journal is not None:
            self._journal.note(
                kind,
                Outcome.SUCCESS,
                user_id=user_id,
                actor_id=self._service_user_id,
                room_id=about.room_id,
                care_team=about.care_team,
                request=about.request,
                detail=detail,
            )

    async def send_state(
        self, room_id: str, event_type: str, state_key: str, content: dict[str, Any]
    ) -> None:
        try:
            await self._api.create_and_send_event_into_room(
                {
                    "type": event_type,
                    "state_key": state_key,
                    "room_id": room_id,
                    "sender": self._service_user_id,
                    "content": content,
                }
            )
        except Exception:
            MATRIX_ACTIONS_FAILED.labels(action="state").inc()
            raise

    async def post(self, room_id: str, sender: str, content: dict[str, Any]) -> str:
        event = await self._api.create_and_send_event_into_room(
            {"type": "m.room.message", "room_id": room_id, "sender": sender, "content": content}
        )
        return str(event.event_id)

    async def _membership(
        self,
        about: Audited,
        user_id: str,
        membership: str,
        content: dict | None,
        action: str,
        failed: list[str],
    ) -> None:
        try:
            await self._api.update_room_membership(
                self._service_user_id, user_id, about.room_id, membership, content
            )
        except Exception as e:
            # (The user id stays out of the log: it can name a patient.)
            logger.warning("Could not %s a user in %s: %s", action, about.room_id, type(e).__name__)
            MATRIX_ACTIONS_FAILED.labels(action=action).inc()
            failed.append(action)
            return
        self.note(AUDITED_ACTIONS[action], about, user_id=user_id)


@attr.s(frozen=True, auto_attribs=True)
class Audited:
    """Where a change is made, as the audit trail records it."""

    room_id: str
    care_team: str | None = None
    request: str | None = None


def _state(event_type: str, state_key: str, content: dict[str, Any]) -> dict[str, Any]:
    return {"type": event_type, "state_key": state_key, "content": content}


def _privileged_creators(create_event: Any) -> frozenset[str]:
    if create_event is None:
        return frozenset()
    if str(create_event.content.get("room_version")) not in CREATORS_PRIVILEGED:
        return frozenset()
    extra = create_event.content.get("additional_creators")
    extra = [c for c in extra if isinstance(c, str)] if isinstance(extra, list) else []
    return frozenset({create_event.sender, *extra})


def fitting_name(name: str) -> str:
    """A name from FHIR within the 255 bytes Matrix allows a room name (a longer one is
    refused by clients, or makes the event too large to send at all)."""
    name = clean_text(name)
    encoded = name.encode("utf-8")
    if len(encoded) <= ROOM_NAME_BYTES:
        return name
    return (
        encoded[: ROOM_NAME_BYTES - len(ELLIPSIS.encode("utf-8"))].decode("utf-8", errors="ignore")
        + ELLIPSIS
    )
