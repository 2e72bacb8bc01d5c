"""``GET …/admin/api/networks?limit=N&from=…`` (or ``?care_team=CareTeam/12``: that team
alone): care teams ↔ spaces ↔ rooms, each room's Matrix members next to who FHIR says
belongs there.

Per CareTeam the module made a space for (its own record, ``binding_store``): the team's
reference and status, the space, and each of its rooms (the space first, then the thread
rooms with their CommunicationRequest) with who is joined and invited now (room state,
through ModuleApi) and who is pending: to invite (FHIR lists them, the room does not hold
them) and to remove (the room holds them, FHIR no longer lists them). Who FHIR lists comes
from the team directory (what access decisions use, cached), combined as the sync combines
it (``sync.membership_plan.room_target``); the sync makes the room match on its next run.

References and Matrix user ids only: no names (a team's or a person's name can name the
patient). Pages of ``limit`` teams (``next``: the ``from`` of the page after), each with at
most ``MAX_ROOMS`` rooms.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from typing import Any

import attr
from synapse.module_api import DirectServeJsonResource, ModuleApi, SynapseRequest

from synapse_fhir_module.enforcement import binding_store
from synapse_fhir_module.enforcement.binding_store import Binding
from synapse_fhir_module.fhir.care_team import TeamMembership
from synapse_fhir_module.fhir.team_directory import CareTeamDirectory, DirectoryUnavailable
from synapse_fhir_module.mapping.thread_status import ThreadMode, parse_mode
from synapse_fhir_module.sync import store as sync_store
from synapse_fhir_module.sync.membership_plan import RoomTarget, plan_membership, room_target
from synapse_fhir_module.web.admin.access import require_admin
from synapse_fhir_module.web.admin.limits import parse_care_team, parse_from, parse_limit

logger = logging.getLogger(__name__)

DEFAULT_LIMIT = 10
MAX_LIMIT = 50
# Rooms shown per team (the space and its first thread rooms); the rest are counted.
MAX_ROOMS = 50


@attr.s(frozen=True, auto_attribs=True)
class RoomView:
    joined: tuple[str, ...]
    invited: tuple[str, ...]
    # None: FHIR could not tell who belongs (the directory unavailable).
    pending_invite: tuple[str, ...] | None
    pending_removal: tuple[str, ...] | None


def room_view(
    target: RoomTarget | None, current: Mapping[str, str], *, keep: Collection[str]
) -> RoomView:
    """The room's members now (``current``: user id → membership) and, against ``target``,
    who is pending: invite (FHIR lists them and may admit them now; not joined, invited or
    knocking — a ban FHIR lifts counts), removal (joined, invited or knocking, not listed,
    not one of ``keep``: the service user, exempt users). Pure: what the sync would do."""
    joined = tuple(sorted(u for u, m in current.items() if m == "join"))
    invited = tuple(sorted(u for u, m in current.items() if m == "invite"))
    if target is None:
        return RoomView(joined, invited, None, None)
    plan = plan_membership(
        target.members,
        current,
        keep=keep,
        admit_new=bool(target.invitable),
        invitable=target.invitable,
    )
    return RoomView(joined, invited, plan.invite, plan.remove)


class NetworksResource(DirectServeJsonResource):
    def __init__(self, api: ModuleApi, teams: CareTeamDirectory, keep: Collection[str]) -> None:
        super().__init__()
        self._api = api
        self._teams = teams
        self._keep = frozenset(keep)

    async def _async_render_GET(self, request: SynapseRequest) -> tuple[int, dict]:
        await require_admin(self._api, request)
        limit = parse_limit(request.args, default=DEFAULT_LIMIT, maximum=MAX_LIMIT)
        team_ref = parse_care_team(request.args)
        if team_ref is not None:
            page = await self._api.run_db_interaction(
                "fhir_admin_space", binding_store.spaces_of_team, team_ref
            )
            more = False
        else:
            spaces = await self._api.run_db_interaction(
                "fhir_admin_spaces", binding_store.spaces_page, parse_from(request.args), limit + 1
            )
            page, more = spaces[:limit], len(spaces) > limit
        networks = [await self._network(team_ref, space_id) for team_ref, space_id in page]
        return 200, {
            "networks": networks,
            "next": page[-1][0] if more and page else None,
        }

    async def _network(self, team_ref: str, space_id: str) -> dict[str, Any]:
        bindings = await self._api.run_db_interaction(
            "fhir_admin_team_rooms", binding_store.bindings_of_team, team_ref
        )
        team = await self._membership(team_ref)
        # The space first, then its thread rooms (its own record lists them that way).
        rooms = [b for b in bindings if b.room_id == space_id] + [
            b for b in bindings if not b.is_space
        ]
        shown = rooms[:MAX_ROOMS]
        return {
            "care_team": team_ref,
            "status": None if team is None else team.status,
            "fhir_available": team is not None,
            "space_id": space_id,
            "rooms": [await self._room(binding, team) for binding in shown],
            "rooms_not_shown": len(rooms) - len(shown),
        }

    async def _room(self, binding: Binding, team: TeamMembership | None) -> dict[str, Any]:
        target: RoomTarget | None = None
        if team is not None:
            teams: list[TeamMembership] | None = [team]
            if len(binding.teams) > 1:
                found = [await self._membership(ref) for ref in binding.teams]
                teams = None if None in found else [t for t in found if t is not None]
            if teams is not None:
                target = room_target(teams, await self._mode(binding))
        state = await self._api.get_room_state(binding.room_id, [("m.room.member", None)])
        current = {key: str(event.content.get("membership")) for (_, key), event in state.items()}
        view = room_view(target, current, keep=self._keep)
        return {
            "room_id": binding.room_id,
            "kind": "space" if binding.is_space else "thread",
            "thread": binding.thread,
            "teams": list(binding.teams),
            "joined": list(view.joined),
            "invited": list(view.invited),
            "pending_invite": None if view.pending_invite is None else list(view.pending_invite),
            "pending_removal": None if view.pending_removal is None else list(view.pending_removal),
        }

    async def _membership(self, team_ref: str) -> TeamMembership | None:
        try:
            return await self._teams.membership(team_ref)
        except DirectoryUnavailable:
            return None

    async def _mode(self, binding: Binding) -> ThreadMode:
        if binding.is_space:
            return ThreadMode.OPEN
        try:
            stored = await self._api.run_db_interaction(
                "fhir_admin_thread_mode", sync_store.thread_mode_of, binding.room_id
            )
        except Exception:  # (the sync's tables: made where the sync runs, maybe not yet)
            logger.debug("Thread modes not readable", exc_info=True)
            return ThreadMode.OPEN
        return ThreadMode.OPEN if stored is None else parse_mode(stored)
