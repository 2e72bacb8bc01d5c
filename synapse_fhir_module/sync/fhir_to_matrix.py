"""FHIR drives Matrix (design.md: mapping): what a changed FHIR resource means for the rooms.

Given a reference — from the webhook, a Subscription, or the reconcile sweep — the sync
reads the resource's *current* state from FHIR (a notification is only a hint) and makes
Matrix match it:

- ``CareTeam``: its space exists while the team is active, holds exactly the current
  members, with their power levels; the team's rooms follow, and their binding state is
  put back where it says something other than the module's record. Inactive or
  suspended: read-only and nobody new; ``entered-in-error``, deleted or outside its
  period: everyone but the service user leaves. The team's next period boundary is
  scheduled (``TeamBoundaries``), so leavers go on time with no FHIR write then.
- ``CommunicationRequest`` addressed to one or more CareTeams: a room in the first team's
  space, listed in the others' and shared by their members (``thread_teams``), made while
  ``draft`` or ``active``; its payload posted as the first message; its status decides
  whether the room is open, read-only or emptied (``thread_status``).
- ``Communication`` written by another system (``foreign_messages``) in a thread with a
  room: posted into the room once by the service user, attributed to its FHIR sender
  (never through a person's own account: whoever writes FHIR must not speak for a Matrix
  user), and never written back; older ones of the thread still pending first, in
  ``meta.lastUpdated`` order; its ``inResponseTo`` as a Matrix reply.
- A person (Practitioner, PractitionerRole, RelatedPerson, Patient): the teams it belongs
  to are synced again.

Applying the same reference twice changes nothing the second time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attr
from synapse.module_api import EventBase, ModuleApi

from synapse_fhir_module.audit.decision import DecisionKind
from synapse_fhir_module.config import SyncConfig
from synapse_fhir_module.enforcement import binding_store
from synapse_fhir_module.enforcement.binding_state import (
    SPACE_CHILD,
    drifted,
    expected_content,
    repairs,
)
from synapse_fhir_module.enforcement.binding_store import Binding
from synapse_fhir_module.enforcement.room_bindings import RoomBindings
from synapse_fhir_module.fhir.care_team import MAX_NESTING, TeamMembership
from synapse_fhir_module.fhir.client import FhirClient
from synapse_fhir_module.fhir.conventions import (
    EVENT_ID_SYSTEM,
    MEMBER_TYPES,
    ORIGIN_TAG,
    ROOM_ID_SYSTEM,
    reference_of,
)
from synapse_fhir_module.fhir.dates import parse_fhir_datetime
from synapse_fhir_module.fhir.errors import FhirError, FhirNotFoundError
from synapse_fhir_module.fhir.person_directory import PersonDirectory
from synapse_fhir_module.fhir.team_directory import CareTeamDirectory
from synapse_fhir_module.fhir.thread_teams import further_teams, request_teams
from synapse_fhir_module.identity.registered_accounts import RegisteredAccounts
from synapse_fhir_module.mapping.relay_content import RelayMessage, RelayPlan, relay_messages
from synapse_fhir_module.mapping.thread_status import (
    ThreadMode,
    opens_room,
    parse_mode,
    thread_mode,
)
from synapse_fhir_module.mapping.unread import LatestMessage
from synapse_fhir_module.sync import store as sync_store
from synapse_fhir_module.sync.care_rooms import Audited, CareRooms, MatrixActionsFailed
from synapse_fhir_module.sync.email_invites import EmailInvites
from synapse_fhir_module.sync.foreign_messages import (
    answered,
    conditional_event_id,
    is_module_written,
    literal_id,
    part_of,
    recorded_event_id,
    relay_order,
    with_reply,
)
from synapse_fhir_module.sync.membership_plan import MembershipPlan, plan_membership, room_target
from synapse_fhir_module.sync.metrics import BINDING_INCIDENTS, PAYLOAD_PARTS_SKIPPED
from synapse_fhir_module.sync.team_boundaries import TeamBoundaries

logger = logging.getLogger(__name__)

# (cursor, room id, message) → None: a relayed part noted as the room's latest message.
NoteRelayed = Callable[[sync_store.Cursor, str, LatestMessage], None]

SYNCED_TYPES = ("CareTeam", "CommunicationRequest", "Communication", *MEMBER_TYPES)
DEFAULT_ROOM_NAME = "Conversation"
# How a relayed message's sender without a name in FHIR is shown.
UNNAMED = {
    "Practitioner": "A practitioner",
    "RelatedPerson": "A related person",
    "Patient": "A patient",
}
# At most this many of a thread's older Communications are looked at, per relay, for ones
# still waiting (one page: the catch-up after an outage, not a replay of the thread).
CATCH_UP = 50
# Set once the spaces and rooms made before the binding record existed are in it.
RECORD_MIGRATED = "bindings:migrated"


class SyncIncomplete(Exception):
    """Part of a sync failed; the change queue tries the whole reference again later."""


class FhirSync:
    def __init__(
        self,
        api: ModuleApi,
        config: SyncConfig,
        fhir: FhirClient,
        teams: CareTeamDirectory,
        rooms: CareRooms,
        *,
        service_user_id: str,
        exempt_users: frozenset[str],
        bindings: RoomBindings,
        persons: PersonDirectory,
        boundaries: TeamBoundaries,
        now_ms: Callable[[], int],
        accounts: RegisteredAccounts | None = None,
        invites: EmailInvites | None = None,
        note_relayed: NoteRelayed | None = None,
    ) -> None:
        self._api = api
        # Told of each part of a Communication relayed into a room, in the transaction
        # that records it relayed (so a crash cannot leave it relayed but not noted).
        self._note_relayed = note_relayed
        self._bindings = bindings
        self._persons = persons
        self._boundaries = boundaries
        self._now_ms = now_ms
        self._accounts = accounts
        self._invites = invites
        self._config = config
        self._fhir = fhir
        self._teams = teams
        self._rooms = rooms
        self._service_user_id = service_user_id
        self._keep = exempt_users | {service_user_id}
        # Teams listing each team of the batch being applied, found by `prepare`.
        self._parents_found: dict[str, set[str]] = {}
        # When the batch being applied started: membership read since is fresh enough.
        self._batch_started = teams.now()
        # Binding state found changed behind the module's back, since start.
        self.binding_incidents = 0

    async def start(self) -> None:
        await self._api.run_db_interaction("fhir_sync_schema", sync_store.create_schema)
        await self._bindings.start()
        await self._record_made_rooms()

    async def apply(self, reference: str, changed: bool = True) -> None:
        """Make Matrix match the current state of ``reference`` (``Type/id``).

        ``changed`` False: queued to be checked (full reconcile, period boundary), not
        because FHIR said it changed: teams listing it are left alone.
        """
        resource_type = reference.split("/", 1)[0]
        if resource_type == "CareTeam":
            await self.apply_care_team(reference)
            if not changed:
                return
            # Teams that list this one (directly or further up) change with it.
            for parent in await self._teams_listing(reference):
                await self._apply_fresh(parent)
        elif resource_type == "CommunicationRequest":
            await self._apply_request(reference)
        elif resource_type == "Communication":
            await self._relay(reference)
        elif resource_type in MEMBER_TYPES:
            for team_ref in await self._teams_listing(reference):
                await self._apply_fresh(team_ref)

    async def prepare(self, references: list[str]) -> None:
        """Before a batch is applied (ChangeQueue): its CareTeams' members, and the teams
        listing them, in one search each per batch rather than two searches per team."""
        self._parents_found = {}
        self._batch_started = self._teams.now()
        teams = [r for r in references if r.startswith("CareTeam/")]
        if len(teams) < 2:
            return  # one team: its own searches cost the same
        await self._teams.prefetch(teams)
        parents: dict[str, set[str]] = {team: set() for team in teams}
        listing = await self._fhir.search_json(
            "CareTeam", {"participant": ",".join(teams), "_elements": "id,participant"}
        )
        for parent in listing:
            if not isinstance(parent.get("id"), str):
                continue
            for participant in parent.get("participant") or []:
                if not isinstance(participant, dict):
                    continue
                member = reference_of(participant.get("member"))
                if member in parents and member != f"CareTeam/{parent['id']}":
                    parents[member].add(f"CareTeam/{parent['id']}")
        self._parents_found = parents

    async def _apply_fresh(self, team_ref: str) -> None:
        # Its answer may predate the change (other workers' copies too): forget it first.
        await self._teams.invalidate_team(team_ref)
        await self.apply_care_team(team_ref)

    async def _teams_listing(self, reference: str) -> list[str]:
        """Every CareTeam that reaches ``reference`` through its participants, up to the
        nesting depth membership resolution follows."""
        found: list[str] = []
        frontier = [reference]
        for _ in range(MAX_NESTING):
            next_frontier = []
            for ref in frontier:
                for team in await self._teams_of_person(ref):
                    if team != reference and team not in found:
                        found.append(team)
                        next_frontier.append(team)
            if not next_frontier:
                break
            frontier = next_frontier
        return found

    async def apply_care_team(self, team_ref: str) -> str | None:
        """Sync the team's space and rooms; the space's room id, if it has one."""
        team = await self._teams.fresh_membership(team_ref, since=self._batch_started)
        self._boundaries.schedule(team_ref, team.next_change)
        space = await self._room_of(team_ref)
        if space is None:
            if not team.admits_members:
                return None  # no space for a team nobody may join
            space = await self._rooms.create_space(
                team_ref, team.name or self._config.default_space_name
            )
            await self._remember_room(team_ref, space)
            await self._bindings.record(Binding(space, team_ref), self._now_ms())
            logger.info("Made a space for %s: %s", team_ref, space)
        recorded = await self._api.run_db_interaction(
            "fhir_bindings_of_team", binding_store.bindings_of_team, team_ref
        )
        if any(binding.room_id == space for binding in recorded):
            # The module's record says which rooms are the team's (a room listed in the
            # space behind its back is not, and its listing is undone below).
            rooms = [binding.room_id for binding in recorded]
        else:  # a space bound before the record existed: the rooms its listing names
            rooms = [space, *await self._rooms.rooms_of_space(space)]
        failed = 0
        for room_id in rooms:
            # Membership first and on its own: a binding that cannot be repaired must not
            # keep a leaver in the room.
            binding = next((b for b in recorded if b.room_id == room_id), None)
            try:
                teams = [team]
                if binding is not None and len(binding.teams) > 1:
                    # A room shared with other teams: all of them, or each team's sync would
                    # undo the others'.
                    teams = [await self._membership_of(ref, team) for ref in binding.teams]
                await self._sync_room(room_id, teams, await self._thread_mode(room_id))
            except Exception as e:  # e.g. a room an admin shut down: the others still follow
                failed += 1
                logger.warning("%s: could not sync %s (%s)", team_ref, room_id, _safe(e))
            if binding is None:
                continue
            try:
                await self._repair_binding(binding, recorded)
            except Exception as e:
                failed += 1
                logger.warning("%s: could not repair %s (%s)", team_ref, room_id, _safe(e))
        if self._invites is not None and team.admits_members:
            try:
                await self._invites.invite(team.without_account)
            except FhirError as e:  # only an invitation: the next sync of the team tries again
                logger.info("%s: invitations by email not sent (%s)", team_ref, _safe(e))
        if failed:
            raise SyncIncomplete(f"{team_ref}: {failed} room(s) not synced")
        return space

    async def _membership_of(self, team_ref: str, known: TeamMembership) -> TeamMembership:
        if team_ref == known.team:
            return known
        return await self._teams.fresh_membership(team_ref, since=self._batch_started)

    async def _repair_binding(self, binding: Binding, team_bindings: list[Binding]) -> None:
        """Put the room's binding state back to what the module bound, if it drifted."""
        fixes = repairs(
            binding,
            await self._rooms.binding_state(binding.room_id),
            children=team_bindings,
            server_name=self._api.server_name,
        )
        for event_type, state_key, content in fixes:
            logger.warning(
                "Binding state %s of %s differs from what the module bound: repairing",
                event_type,
                binding.room_id,
            )
            await self._rooms.send_state(binding.room_id, event_type, state_key, content)

    async def drift_of(self, event: EventBase) -> str | None:
        """For a binding state event in a room the module bound: the room's team when the
        event says something else than the module bound (an incident), else None."""
        binding = await self._bindings.recorded(event.room_id)
        if binding is None:
            return None
        current = await self._api.get_room_state(event.room_id, [(event.type, event.state_key)])
        now = current.get((event.type, event.state_key))
        if now is None or now.event_id != event.event_id:
            return None  # not what the room says now (state resolution kept another event)
        children = {}
        if event.type == SPACE_CHILD and binding.is_space:
            child = await self._bindings.recorded(event.state_key)
            if child is not None:
                children[child.room_id] = child
        want = expected_content(
            binding,
            event.type,
            event.state_key,
            children=children,
            server_name=self._api.server_name,
        )
        if not drifted(want, event.content):
            return None
        self._note_binding_incident(event.room_id, event.event_id, event.type)
        return binding.care_team

    def _note_binding_incident(self, room_id: str, event_id: str, event_type: str) -> None:
        self.binding_incidents += 1
        BINDING_INCIDENTS.inc()
        logger.warning(
            "Binding state of %s changed behind the module's back by %s (%s); "
            "the room stays bound as recorded and is repaired",
            room_id,
            event_id,
            event_type,
        )

    async def _sync_room(
        self,
        room_id: str,
        teams: Sequence[TeamMembership],
        mode: ThreadMode = ThreadMode.OPEN,
    ) -> None:
        """Make the room's members and power levels match its teams (one, or several for a
        thread addressed to several: their union) and its thread's status."""
        target = room_target(teams, mode)
        members = dict(target.members)
        if members and self._accounts is not None:
            # An account registered as somebody else's before a record named it: nobody's.
            for user_id in await self._accounts.conflicting(
                {user_id: member.person for user_id, member in members.items()}
            ):
                logger.warning(
                    "%s: %s names an account registered as another person's; left out",
                    room_id,
                    members[user_id].person,
                )
                del members[user_id]
        plan = plan_membership(
            members,
            await self._rooms.memberships(room_id),
            keep=self._keep,
            admit_new=bool(target.invitable),
            invitable=target.invitable,
        )
        # Power levels first, so an invitee arrives with theirs (a removal still happens
        # if setting them fails: apply_plan runs in `finally`).
        request = await self._request_of(room_id)
        try:
            await self._rooms.set_power_levels(
                room_id,
                list(members.values()),
                read_only=not (target.kept and target.writable),
                care_team=teams[0].team,
                request=request,
            )
        finally:
            await self._apply_plan(room_id, teams[0].team, plan, request)

    async def _apply_plan(
        self, room_id: str, team_ref: str, plan: MembershipPlan, request: str | None = None
    ) -> None:
        if not plan.empty:
            logger.info(
                "%s: inviting %d, removing %d in %s",
                team_ref,
                len(plan.invite),
                len(plan.remove),
                room_id,
            )
            await self._rooms.apply_plan(room_id, plan, care_team=team_ref, request=request)

    async def _team_of(self, room_id: str) -> str | None:
        """The room's (first) team, for the audit trail (None when it cannot be told now)."""
        try:
            teams = await self._bindings.care_teams_of(room_id)
        except Exception:
            return None
        return teams[0] if teams else None

    async def _request_of(self, room_id: str) -> str | None:
        """The thread a room is bound to, for the audit trail (None for a space, or when
        it cannot be told now: the audit then names the team and the room only)."""
        try:
            return await self._bindings.thread_of(room_id)
        except Exception:
            return None

    async def _record_made_rooms(self) -> None:
        """Spaces and rooms made before the module kept its binding record: recorded once,
        from the binding state the service user wrote then (a thread's room with the team
        whose space lists it, whatever its request says now)."""
        if await self._api.run_db_interaction(
            "fhir_sync_state", sync_store.get_value, RECORD_MIGRATED
        ):
            return
        made = await self._api.run_db_interaction("fhir_sync_rooms", sync_store.all_rooms)
        spaces = {room_id: ref for ref, room_id in made if ref.startswith("CareTeam/")}
        for space, team_ref in spaces.items():
            if await self._bindings.recorded(space) is None:
                await self._bindings.record(Binding(space, team_ref), self._now_ms())
            for room_id in await self._rooms.rooms_of_space(space):
                if room_id != space and await self._bindings.recorded(room_id) is None:
                    thread = await self._bindings.thread_of(room_id)
                    await self._bindings.record(
                        Binding(room_id, team_ref, thread=thread, space_id=space),
                        self._now_ms(),
                    )
        await self._api.run_db_interaction(
            "fhir_sync_state_set", sync_store.set_value, RECORD_MIGRATED, "1"
        )

    async def _apply_request(self, request_ref: str) -> str | None:
        """The request's room, made (or completed, after a failure) if it needs one."""
        request = await self._read(request_ref)
        if request is not None and _is_own(request):
            return None  # a thread the module opened for an existing room
        room_id = await self._room_of(request_ref)
        if request is None:
            if room_id is not None:
                # Deleted: whatever the thread was, nobody sees it any longer (fail closed).
                await self._empty(room_id, request_ref)
            return None
        wanted = request_teams(request)
        if not wanted:
            binding = await self._bindings.recorded(room_id) if room_id is not None else None
            if binding is None:
                return None
            # Addressed to no team any more: its room stays with the team it was made for
            # (thread_teams), and the request's status still applies to it.
            wanted = [binding.care_team]
        mode = thread_mode(request.get("status"))
        if room_id is not None and await self._thread_mode(room_id) is ThreadMode.EMPTIED:
            # entered-in-error is final: the request back to active must not show the
            # thread's history to its teams again (a new request makes a new room).
            mode = ThreadMode.EMPTIED
        if room_id is None:
            if not opens_room(request.get("status")):
                return None  # arrived closed: no room (thread_status)
            space = await self.apply_care_team(wanted[0])
            if space is None:
                return None
            room_id = await self._rooms.create_thread_room(space, request_ref)
            # Remembered at once: a retry after a later step failed completes this room
            # instead of making a second one.
            await self._remember_room(request_ref, room_id)
            await self._bindings.record(
                Binding(
                    room_id,
                    wanted[0],
                    thread=request_ref,
                    space_id=space,
                    further_teams=further_teams(wanted[0], wanted),
                ),
                self._now_ms(),
            )
            logger.info("Made a room for %s: %s", request_ref, room_id)
            await self._rooms.name_room(room_id, _request_name(request))
        binding = await self._bindings.recorded(room_id)
        # The room (and its history) stays with the team it was made for (thread_teams).
        first = binding.care_team if binding is not None else wanted[0]
        if first not in wanted:
            logger.warning(
                "%s no longer addresses %s; its room %s stays with it", request_ref, first, room_id
            )
        further = further_teams(first, wanted)
        before = binding.further_teams if binding is not None else ()
        space = await self._room_of(first)
        if space is not None:
            if binding is None or binding.further_teams != further:
                # (None: made before the record existed.) Recorded before the spaces list
                # it, so no team's sync takes the listing for drift.
                bound = binding or Binding(room_id, first, thread=request_ref, space_id=space)
                await self._bindings.record(
                    attr.evolve(bound, further_teams=further), self._now_ms()
                )
            await self._rooms.link_to_space(space, room_id)
            # The other teams' spaces list it too (made if need be); dropped ones no longer.
            for team_ref in further:
                team_space = await self._room_of(team_ref) or await self.apply_care_team(team_ref)
                if team_space is not None:
                    await self._rooms.link_to_space(team_space, room_id)
            for team_ref in sorted(set(before) - set(further)):
                team_space = await self._room_of(team_ref)
                if team_space is not None:
                    await self._rooms.unlink_from_space(team_space, room_id)
        if mode is ThreadMode.EMPTIED:
            await self._empty(room_id, first)
            return room_id
        # The request's own words first, so whoever is invited finds them there (kept like
        # a relay, so a reply to them is linked to the request) — only into an open room,
        # and words that cannot be posted (too long, say) hold no status or team back.
        unposted: Exception | None = None
        if mode is ThreadMode.OPEN:
            try:
                opening = relay_messages(
                    request.get("payload"), source=request_ref, sender_name=None
                )
                await self._post_parts(request_ref, room_id, opening)
            except Exception as e:
                unposted = e
        # Stored before the room follows it: a sync of the team meanwhile reads it too.
        await self._api.run_db_interaction(
            "fhir_thread_mode_set", sync_store.set_thread_mode, room_id, mode.value
        )
        teams = [
            await self._teams.fresh_membership(team_ref, since=self._batch_started)
            for team_ref in (first, *further)
        ]
        await self._sync_room(room_id, teams, mode)
        if unposted is not None:
            raise SyncIncomplete(f"{request_ref}: its text not posted ({_safe(unposted)})")
        return room_id

    async def _empty(self, room_id: str, about: str) -> None:
        """Empty a thread's room for good (entered-in-error, or its request deleted): no
        FHIR read needed, so an outage cannot keep anyone in."""
        await self._api.run_db_interaction(
            "fhir_thread_mode_set", sync_store.set_thread_mode, room_id, ThreadMode.EMPTIED.value
        )
        binding = await self._bindings.recorded(room_id)
        team = TeamMembership(
            team=binding.care_team if binding is not None else about,
            status="entered-in-error",
            members={},
        )
        await self._sync_room(room_id, [team], ThreadMode.EMPTIED)

    async def _thread_mode(self, room_id: str) -> ThreadMode:
        """What the room's request status last made it (open when none was stored)."""
        stored = await self._api.run_db_interaction(
            "fhir_thread_mode_of", sync_store.thread_mode_of, room_id
        )
        return ThreadMode.OPEN if stored is None else parse_mode(stored)

    async def _relay(self, communication_ref: str) -> None:
        communication = await self._read(communication_ref)
        if communication is None or is_module_written(communication):
            return  # ours came from Matrix: relaying it would echo the message
        found = await self._thread_room(communication.get("partOf"))
        if found is None:
            return
        thread, room_id = found
        if await self._thread_mode(room_id) is ThreadMode.EMPTIED:
            return  # nobody is there, and the thread should never have been
        # Older ones of the thread still waiting (an outage, notifications out of order)
        # go first, so the room shows the thread in FHIR's order.
        for earlier in await self._waiting_before(thread, communication):
            try:
                await self._relay_one(earlier, thread, room_id)
            except Exception as e:  # (its own notification's retry carries on with it)
                logger.warning(
                    "%s: an earlier Communication of %s could not be relayed (%s)",
                    room_id,
                    thread,
                    _safe(e),
                )
        await self._relay_one(communication, thread, room_id)

    async def _waiting_before(
        self, thread: str, communication: Mapping[str, Any]
    ) -> list[Mapping[str, Any]]:
        """The thread's foreign Communications older than ``communication`` not relayed
        yet, oldest first (among the newest ``CATCH_UP``)."""
        meta = communication.get("meta")
        last_updated = meta.get("lastUpdated") if isinstance(meta, Mapping) else None
        try:
            parse_fhir_datetime(str(last_updated))
        except (ValueError, ArithmeticError):
            return []  # (FHIR's own clock: unreadable only from a broken server)
        params = [
            ("part-of", thread),
            ("_lastUpdated", f"le{last_updated}"),
            ("_tag:not", f"{ORIGIN_TAG['system']}|{ORIGIN_TAG['code']}"),
            ("_sort", "-_lastUpdated"),
            ("_count", str(CATCH_UP)),
        ]
        page: list[Mapping[str, Any]] = []
        async for bundle in self._fhir.search_pages_json("Communication", params):
            page = [
                e["resource"]
                for e in bundle.get("entry") or []
                if isinstance(e, dict) and isinstance(e.get("resource"), dict)
            ]
            break  # the newest page only
        waiting = []
        for resource in page:
            if (
                resource.get("id") == communication.get("id")
                or not isinstance(resource.get("id"), str)
                or is_module_written(resource)
                or not part_of(resource, thread)
            ):
                continue
            if not await self._api.run_db_interaction(
                "fhir_relay_claimed", sync_store.is_claimed, f"Communication/{resource['id']}"
            ):
                waiting.append(resource)
        return relay_order(waiting)

    async def _relay_one(self, communication: Mapping[str, Any], thread: str, room_id: str) -> None:
        communication_ref = f"Communication/{communication.get('id')}"
        if communication.get("status") == "entered-in-error":
            return
        sender_ref = reference_of(communication.get("sender"))
        sender = await self._read(sender_ref) if sender_ref else None
        plan = relay_messages(
            communication.get("payload"),
            source=communication_ref,
            sender_name=_display_name(sender),
            sender_ref=sender_ref,
        )
        if plan.messages:
            reply_to = await self._reply_target(communication, thread, room_id)
            if reply_to is not None:
                first = plan.messages[0]
                replying = RelayMessage(first.key, with_reply(first.content, reply_to))
                plan = attr.evolve(plan, messages=(replying, *plan.messages[1:]))

        def as_latest(event_id: str) -> LatestMessage:
            return LatestMessage(
                event_id, self._now_ms(), self._service_user_id, communication_ref, sender_ref
            )

        if await self._post_parts(communication_ref, room_id, plan, as_latest):
            logger.info("Relayed %s into %s", communication_ref, room_id)
            # For the audit trail: which Communication went into which room (never its text).
            self._rooms.note(
                DecisionKind.MESSAGE_RELAYED,
                Audited(room_id, await self._team_of(room_id), thread),
                detail=communication_ref,
            )

    async def _reply_target(
        self, communication: Mapping[str, Any], thread: str, room_id: str
    ) -> str | None:
        """The event in ``room_id`` that the Communication's ``inResponseTo`` points at:
        a relayed message's first event, or the event a Communication of the same thread
        was recorded from (never an event the FHIR writer names outside the thread)."""
        reference = answered(communication)
        if reference is None:
            return None
        target_id = literal_id(reference)
        if target_id is not None:
            relayed = await self._api.run_db_interaction(
                "fhir_relayed_event",
                sync_store.relayed_event,
                f"Communication/{target_id}",
                room_id,
            )
            if relayed:
                return str(relayed)
            target = await self._read(f"Communication/{target_id}")
        else:
            event_id = conditional_event_id(reference)
            if event_id is None:
                return None
            found = await self._fhir.search_json(
                "Communication", {"identifier": f"{EVENT_ID_SYSTEM}|{event_id}"}
            )
            target = found[0] if len(found) == 1 else None
        if target is None or not part_of(target, thread):
            return None
        return recorded_event_id(target)

    async def _post_parts(
        self,
        source: str,
        room_id: str,
        plan: RelayPlan,
        as_latest: Callable[[str], LatestMessage] | None = None,
    ) -> int:
        """Post each message of ``plan`` once, in order; how many were posted now.

        Parts the room cannot show are counted (and logged by index, never content) when
        the resource is first posted, or on every try when it shows nothing at all.
        ``as_latest``: for a Communication, each posted part as the room's latest message."""
        posted = 0
        for message in plan.messages:
            if await self._post_once(
                message.key, room_id, self._service_user_id, message.content, as_latest
            ):
                posted += 1
        if plan.skipped and (posted or not plan.messages):
            PAYLOAD_PARTS_SKIPPED.inc(plan.skipped)
            logger.info(
                "%s: %d payload part(s) not posted (no http(s) or mxc:// URL)",
                source,
                plan.skipped,
            )
        return posted

    async def _post_once(
        self,
        source: str,
        room_id: str,
        poster: str,
        content: dict[str, Any],
        as_latest: Callable[[str], LatestMessage] | None = None,
    ) -> bool:
        """Post what ``source`` says into the room unless it was posted before; False then.

        Claimed before posting, so a retry never posts twice; the claim is given back if
        the post fails, so a retry or the next sweep posts it.
        """
        if not await self._api.run_db_interaction(
            "fhir_relay_claim", sync_store.claim_relay, source, room_id, poster
        ):
            return False
        try:
            event_id = await self._rooms.post(room_id, poster, content)
        except Exception:
            await self._api.run_db_interaction(
                "fhir_relay_release", sync_store.release_relay, source
            )
            raise
        note = self._note_relayed if as_latest is not None else None

        def relayed(txn: sync_store.Cursor) -> None:
            sync_store.relayed_as(txn, source, event_id)
            if note is not None and as_latest is not None:
                note(txn, room_id, as_latest(event_id))

        await self._api.run_db_interaction("fhir_relay_done", relayed)
        return True

    async def _thread_room(self, part_of: Any) -> tuple[str, str] | None:
        """The thread a Communication is part of that has a care-team room, and the room.

        Only rooms FHIR cannot point anywhere else: a room the sync made for that request,
        or a room whose own (service-user) binding names the request. A request's room-id
        identifier alone proves nothing — anyone writing FHIR could name any room.
        """
        for item in part_of if isinstance(part_of, list) else []:
            reference = reference_of(item)
            if not reference or not reference.startswith("CommunicationRequest/"):
                continue
            room_id = await self._room_of(reference)
            if room_id:
                return reference, room_id
            request = await self._read(reference)
            if request is None:
                continue
            if not _is_own(request):
                # A request whose room is not made yet (its own notification may be
                # behind this one): make it now.
                room_id = await self._apply_request(reference)
                if room_id:
                    return reference, room_id
                continue
            for identifier in request.get("identifier") or []:
                if not isinstance(identifier, Mapping) or identifier.get("system") != (
                    ROOM_ID_SYSTEM
                ):
                    continue
                candidate = identifier.get("value")
                if isinstance(candidate, str) and candidate.startswith("!"):
                    if await self._bindings.thread_of(candidate) == reference:
                        return reference, candidate
        return None

    async def _teams_of_person(self, person_ref: str) -> list[str]:
        """The CareTeams listing ``person_ref`` (a person, role or team) as a participant."""
        prepared = self._parents_found.pop(person_ref, None)
        if prepared is not None:
            return sorted(prepared)
        found = await self._fhir.search_json(
            "CareTeam", {"participant": person_ref, "_elements": "id"}
        )
        teams = {f"CareTeam/{r['id']}" for r in found if isinstance(r.get("id"), str)}
        if person_ref.startswith("Practitioner/"):
            roles = await self._fhir.search_json(
                "PractitionerRole", {"practitioner": person_ref, "_elements": "id"}
            )
            for role in roles:
                if isinstance(role.get("id"), str):
                    teams |= set(await self._teams_of_person(f"PractitionerRole/{role['id']}"))
        return sorted(teams)

    async def _read(self, reference: str) -> dict[str, Any] | None:
        resource_type, _, resource_id = reference.partition("/")
        try:
            found = await self._fhir.search_json(resource_type, {"_id": resource_id})
        except FhirNotFoundError:
            return None
        return found[0] if found else None

    async def _room_of(self, reference: str) -> str | None:
        room_id = await self._api.run_db_interaction(
            "fhir_sync_room_of", sync_store.room_of, reference
        )
        return str(room_id) if room_id else None

    async def _remember_room(self, reference: str, room_id: str) -> None:
        await self._api.run_db_interaction(
            "fhir_sync_remember_room", sync_store.remember_room, reference, room_id
        )


def _is_own(resource: Mapping[str, Any]) -> bool:
    meta = resource.get("meta")
    tags = meta.get("tag") if isinstance(meta, Mapping) else None
    return any(
        isinstance(tag, Mapping)
        and tag.get("system") == ORIGIN_TAG["system"]
        and tag.get("code") == ORIGIN_TAG["code"]
        for tag in tags or []
    )


def _request_name(request: Mapping[str, Any]) -> str:
    """A name from the request's category (never its payload: that can name the patient)."""
    for category in request.get("category") or []:
        if not isinstance(category, Mapping):
            continue
        if isinstance(category.get("text"), str) and category["text"]:
            return str(category["text"])
        for coding in category.get("coding") or []:
            if isinstance(coding, Mapping) and isinstance(coding.get("display"), str):
                return str(coding["display"])
    return DEFAULT_ROOM_NAME


def _safe(e: Exception) -> str:
    # FHIR client errors say what failed where (no personal data); Synapse's may not.
    if isinstance(e, MatrixActionsFailed) or type(e).__module__.startswith("synapse_fhir"):
        return f"{type(e).__name__}: {e}"
    return type(e).__name__


def _display_name(person: Mapping[str, Any] | None) -> str:
    """How the sender of a relayed Communication is shown: their name as FHIR has it, else
    what they are — never a Matrix id (a FHIR writer could name anyone's account)."""
    for name in (person or {}).get("name") or []:
        if not isinstance(name, Mapping):
            continue
        if isinstance(name.get("text"), str) and name["text"].strip():
            return str(name["text"]).strip()
        parts = [*(name.get("given") or []), name.get("family")]
        text = " ".join(p for p in parts if isinstance(p, str) and p)
        if text:
            return text
    return UNNAMED.get(str((person or {}).get("resourceType")), "Someone")
