"""Care networks seen from Matrix, for the FHIR-drives-Matrix tests (shim or Subscriptions):
a seeded team whose members have accounts, and what each member sees (invites, memberships)."""

from __future__ import annotations

import uuid
from functools import partial
from typing import Any, Protocol

from devstack.fhir_seed import FhirSeeder
from devstack.hapi import HapiDevServer
from devstack.matrix_client import MatrixError, MatrixUser, register_user
from devstack.synapse import SynapseServer
from devstack.waiting import wait_until
from tests.integration.care_network import CareNetwork

CARE_TEAM_STATE = "org.synapse_fhir.care_team"
THREAD_STATE = "org.synapse_fhir.thread"


class Stack(Protocol):
    """A HAPI that notifies a Synapse (through the shim or Subscriptions), and that Synapse."""

    hapi: HapiDevServer
    synapse: SynapseServer


class Team:
    """A seeded care network whose members have Matrix accounts."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.network = CareNetwork(uuid.uuid4().hex[:8])
        self.fhir = FhirSeeder(stack.hapi.base_url)
        # Accounts first: FHIR then names people who exist in Matrix.
        self.users = {
            name: register_user(stack.synapse, self.network.localpart(name))
            for name in ("anna", "bram", "carla", "henk", "piet", "mallory", "lena")
        }

    def seed(self) -> None:
        self.network.seed(self.fhir)

    def care_team(self) -> dict[str, Any]:
        return self.fhir.read(self.network.team)

    def put_team(self, team: dict[str, Any]) -> None:
        self.fhir.put(team)


# Per user: the last /sync token and the open invites (room → CareTeam it is bound to).
# Incremental syncs: Synapse answers a repeated initial /sync from a cache for minutes.
_since: dict[str, str] = {}
_invites: dict[str, dict[str, str | None]] = {}


def invited_space(user: MatrixUser, team_ref: str) -> str | None:
    """The room the user is invited to whose invite state binds it to ``team_ref``."""
    invites = open_invites(user)
    return next((room for room, ref in sorted(invites.items()) if ref == team_ref), None)


def open_invites(user: MatrixUser) -> dict[str, str | None]:
    """Room → the CareTeam or CommunicationRequest its invite state binds it to."""
    since = _since.get(user.user_id)
    sync = user.request(
        "GET", "/_matrix/client/v3/sync?timeout=0" + (f"&since={since}" if since else "")
    )
    _since[user.user_id] = sync["next_batch"]
    invites = _invites.setdefault(user.user_id, {})
    rooms = sync.get("rooms", {})
    for room_id in [*rooms.get("join", {}), *rooms.get("leave", {})]:
        invites.pop(room_id, None)
    for room_id, room in rooms.get("invite", {}).items():
        invites[room_id] = next(
            (
                e["content"].get("reference")
                for e in room.get("invite_state", {}).get("events", [])
                if e["type"] in (CARE_TEAM_STATE, THREAD_STATE)
            ),
            None,
        )
    return invites


def membership(user: MatrixUser, room_id: str, of: str) -> str | None:
    try:
        state = user.request("GET", f"/_matrix/client/v3/rooms/{room_id}/state/m.room.member/{of}")
    except MatrixError:
        return None
    return str(state["membership"])


# The members of the seeded network who should be invited (see CareNetwork).
CURRENT_MEMBERS = ("anna", "bram", "carla", "henk", "piet")


def member_invites(team: Team, timeout: float) -> dict[str, str]:
    """Each current member's invited space, each waited for within ``timeout``."""
    return {
        name: wait_until(
            partial(invited_space, team.users[name], team.network.team),
            timeout=timeout,
            what=f"{name} invited to the team's space",
        )
        for name in CURRENT_MEMBERS
    }


def expired_error(user: MatrixUser) -> MatrixError | None:
    """The module's "account expired" answer to the user's next request, or None."""
    try:
        user.whoami()
    except MatrixError as e:
        if e.errcode == "ORG_MATRIX_EXPIRED_ACCOUNT":
            return e
        raise
    return None
