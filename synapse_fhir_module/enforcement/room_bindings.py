"""Which care team a room belongs to (design.md: mapping).

First the module's own record (``binding_store``): a room the module bound belongs to that
team whatever its state says now. Other rooms (bound by an operator acting as the service
user, or before the record existed) by room state the service user wrote:

- A space bound with ``org.synapse_fhir.care_team`` belongs to that CareTeam.
- A room belongs to a bound space only when that space lists it: ``m.space.child``
  with this room as state key, sent by the service user. The room's own
  ``m.space.parent`` is only the hint of where to look, never proof — otherwise
  anyone could attach a room to a patient's record.
- A room with ``org.synapse_fhir.thread`` belongs to the CareTeam its
  CommunicationRequest is addressed to.

Only events whose sender is the service user count. Answers are kept per room and
dropped when one of these state events changes (``forget_for_event``, called from
``on_new_event`` on every worker).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from synapse.module_api import EventBase, ModuleApi

from synapse_fhir_module.enforcement import binding_store
from synapse_fhir_module.enforcement.binding_state import (
    BINDING_STATE_TYPES,
    CARE_TEAM_STATE,
    SPACE_CHILD,
    SPACE_PARENT,
    THREAD_STATE,
)
from synapse_fhir_module.enforcement.binding_store import Binding
from synapse_fhir_module.fhir.client import FhirClient
from synapse_fhir_module.fhir.errors import FhirError
from synapse_fhir_module.fhir.team_directory import UNRESOLVED_TEAM, DirectoryUnavailable

logger = logging.getLogger(__name__)

MAX_REMEMBERED_ROOMS = 100_000


class RoomBindings:
    def __init__(self, api: ModuleApi, fhir: FhirClient, service_user_id: str) -> None:
        self._api = api
        self._fhir = fhir
        self._service_user_id = service_user_id
        # Room → its teams (the one it was made for first); () for an ordinary room.
        self._team_of_room: dict[str, tuple[str, ...]] = {}
        self._thread_of_room: dict[str, str | None] = {}
        # Bumped by every forget: an answer resolved across a forget is not kept.
        self._generation = 0
        # Until the record's table exists (start-up), only room state can tell.
        self._record_ready = False

    async def start(self) -> None:
        """Create the record's table if needed (every instance reads it)."""
        await self._api.run_db_interaction("fhir_bindings_schema", binding_store.create_schema)
        self._record_ready = True
        self.forget_all()  # (answers so far came from room state alone)

    async def recorded(self, room_id: str) -> Binding | None:
        """What the module bound ``room_id`` to, from its own record."""
        if not self._record_ready:
            return None
        return await self._api.run_db_interaction(
            "fhir_binding_of", binding_store.binding_of, room_id
        )

    async def record(self, binding: Binding, now_ms: int) -> None:
        """Remember that the module bound a room (authoritative from now on)."""
        await self._api.run_db_interaction("fhir_bind", binding_store.bind, binding, now_ms)
        self.forget_all()

    async def care_team_of(self, room_id: str) -> str | None:
        """``CareTeam/<id>`` the room belongs to (the one it was made for, when it has
        several), or None for an ordinary room."""
        teams = await self.care_teams_of(room_id)
        return teams[0] if teams else None

    async def care_teams_of(self, room_id: str) -> tuple[str, ...]:
        """Every CareTeam whose members share the room, the one it was made for first;
        () for an ordinary room. (Several only by the module's record: room state binds a
        room to one team.)"""
        if room_id in self._team_of_room:
            return self._team_of_room[room_id]
        generation = self._generation
        recorded = await self.recorded(room_id)
        if recorded is not None:
            teams = recorded.teams
        else:
            team = await self._resolve(room_id)
            teams = (team,) if team else ()
        # An unresolved thread may resolve once FHIR shows its request: don't keep that.
        if generation == self._generation and UNRESOLVED_TEAM not in teams:
            if len(self._team_of_room) >= MAX_REMEMBERED_ROOMS:
                self._team_of_room.clear()
            self._team_of_room[room_id] = teams
        return teams

    async def thread_of(self, room_id: str) -> str | None:
        """``CommunicationRequest/<id>`` the room is bound to, if the service user set one."""
        if room_id in self._thread_of_room:
            return self._thread_of_room[room_id]  # (asked for every recorded message)
        generation = self._generation
        recorded = await self.recorded(room_id)
        if recorded is not None:
            thread = recorded.thread
        else:
            state = await self._api.get_room_state(room_id, [(THREAD_STATE, "")])
            thread = self._trusted_reference(state.get((THREAD_STATE, "")), "CommunicationRequest/")
        if generation == self._generation:
            if len(self._thread_of_room) >= MAX_REMEMBERED_ROOMS:
                self._thread_of_room.clear()
            self._thread_of_room[room_id] = thread
        return thread

    def remembered(self, room_id: str) -> tuple[str, ...] | None:
        """The teams remembered for a room (``()``: an ordinary room), or None when nothing
        is remembered (no I/O)."""
        return self._team_of_room.get(room_id)

    async def binding_event_ids(self, room_id: str) -> set[str]:
        """Ids of the current state events that bind this room (to redact-protect them)."""
        state = await self._api.get_room_state(
            room_id, [(event_type, None) for event_type in sorted(BINDING_STATE_TYPES)]
        )
        return {event.event_id for event in state.values()}

    async def membership_of(self, room_id: str, user_id: str) -> str | None:
        """The user's current membership in the room, as this server holds it."""
        state = await self._api.get_room_state(room_id, [("m.room.member", user_id)])
        event = state.get(("m.room.member", user_id))
        return None if event is None else event.content.get("membership")

    def forget_all(self) -> None:
        """Forget every answer (e.g. a CommunicationRequest changed its recipients)."""
        self._generation += 1
        self._team_of_room.clear()
        self._thread_of_room.clear()

    def forget_for_event(self, event: EventBase) -> None:
        """Drop remembered answers that a state event may have changed."""
        if not event.is_state() or event.type not in BINDING_STATE_TYPES:
            return
        self._generation += 1
        self._team_of_room.pop(event.room_id, None)
        self._thread_of_room.pop(event.room_id, None)
        if event.type == SPACE_CHILD:
            self._team_of_room.pop(event.state_key, None)
        elif event.type == CARE_TEAM_STATE:
            # Every room hanging off this space may have changed team.
            self._team_of_room.clear()

    async def _resolve(self, room_id: str) -> str | None:
        state = await self._api.get_room_state(
            room_id, [(CARE_TEAM_STATE, ""), (THREAD_STATE, ""), (SPACE_PARENT, None)]
        )
        own = self._trusted_reference(state.get((CARE_TEAM_STATE, "")), "CareTeam/")
        if own:
            return own
        for (event_type, parent_id), event in state.items():
            if event_type == SPACE_PARENT and _has_via(event.content):
                team = await self._team_of_listing_space(parent_id, room_id)
                if team:
                    return team
        thread = self._trusted_reference(state.get((THREAD_STATE, "")), "CommunicationRequest/")
        if thread:
            return await self._team_of_thread(thread)
        return None

    async def _team_of_listing_space(self, space_id: str, room_id: str) -> str | None:
        state = await self._api.get_room_state(
            space_id, [(CARE_TEAM_STATE, ""), (SPACE_CHILD, room_id)]
        )
        child = state.get((SPACE_CHILD, room_id))
        if child is None or child.sender != self._service_user_id or not _has_via(child.content):
            return None
        return self._trusted_reference(state.get((CARE_TEAM_STATE, "")), "CareTeam/")

    async def _team_of_thread(self, thread_ref: str) -> str:
        """The CareTeam among the CommunicationRequest's recipients."""
        try:
            thread_id = thread_ref.split("/", 1)[1]
            request = await self._fhir.search_json("CommunicationRequest", {"_id": thread_id})
        except FhirError as e:
            raise DirectoryUnavailable(f"{thread_ref}: {e}") from e
        for resource in request:
            for recipient in resource.get("recipient") or []:
                ref = recipient.get("reference") if isinstance(recipient, Mapping) else None
                if isinstance(ref, str) and ref.startswith("CareTeam/"):
                    return ref
        # A thread whose request names no team: nobody can be shown to belong.
        return UNRESOLVED_TEAM

    def _trusted_reference(self, event: EventBase | None, prefix: str) -> str | None:
        if event is None or event.sender != self._service_user_id:
            return None
        reference = event.content.get("reference")
        if isinstance(reference, str) and reference.startswith(prefix) and "/" in reference:
            return reference
        return None


def _has_via(content: Mapping[str, Any]) -> bool:
    # An m.space.parent/child without `via` is a removed link.
    via = content.get("via")
    return isinstance(via, list) and len(via) > 0
