"""What the demo's people see in Matrix: their invites (through incremental /sync), a room's
messages, and — for an admin — who is in a room with which power level."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from devstack.matrix_client import MatrixUser

BINDING_STATE = ("org.synapse_fhir.care_team", "org.synapse_fhir.thread")


class Inbox:
    """One user's open invites, each with the FHIR resource its invite state binds it to.

    Incremental syncs after the first: Synapse may answer a repeated initial /sync from a
    cache, which would hide new invites.
    """

    def __init__(self, user: MatrixUser) -> None:
        self.user = user
        self._since: str | None = None
        self.invites: dict[str, str | None] = {}

    def invite_for(self, reference: str) -> str | None:
        """The room the user is invited to that is bound to ``reference``, once there is one."""
        self._sync()
        return next((room for room, ref in self.invites.items() if ref == reference), None)

    def _sync(self) -> None:
        path = "/_matrix/client/v3/sync?timeout=0"
        if self._since:
            path += f"&since={quote(self._since)}"
        sync = self.user.request("GET", path)
        self._since = sync["next_batch"]
        rooms = sync.get("rooms", {})
        for room_id in [*rooms.get("join", {}), *rooms.get("leave", {})]:
            self.invites.pop(room_id, None)
        for room_id, room in rooms.get("invite", {}).items():
            self.invites[room_id] = _binding(room.get("invite_state", {}).get("events", []))


def _binding(events: list[dict[str, Any]]) -> str | None:
    for event in events:
        if event["type"] in BINDING_STATE:
            return str(event["content"].get("reference"))
    return None


def messages(user: MatrixUser, room_id: str) -> list[dict[str, Any]]:
    """The room's m.room.message events, oldest first."""
    chunk = user.request(
        "GET", f"/_matrix/client/v3/rooms/{quote(room_id)}/messages?dir=f&limit=100"
    )["chunk"]
    return [e for e in chunk if e["type"] == "m.room.message"]


def send_reply(user: MatrixUser, room_id: str, parent_event_id: str, text: str) -> str:
    return user.send(
        room_id,
        {
            "msgtype": "m.text",
            "body": text,
            "m.relates_to": {"m.in_reply_to": {"event_id": parent_event_id}},
        },
    )


def room_members(admin: MatrixUser, room_id: str) -> dict[str, tuple[str, int | None]]:
    """User → (membership, power level), from the room's state through the admin API.

    The level is None for a creator of a room version 12 room: creators stand above every
    power level there and are not listed.
    """
    state = admin.request("GET", f"/_synapse/admin/v1/rooms/{quote(room_id)}/state")["state"]
    levels: dict[str, Any] = {}
    members: dict[str, str] = {}
    creators: set[str] = set()
    for event in state:
        if event["type"] == "m.room.power_levels":
            levels = event["content"]
        elif event["type"] == "m.room.member":
            members[event["state_key"]] = event["content"]["membership"]
        elif event["type"] == "m.room.create" and str(event["content"].get("room_version")) == "12":
            creators = {event["sender"], *event["content"].get("additional_creators", [])}
    users = levels.get("users", {})
    default = int(levels.get("users_default", 0))
    return {
        user: (membership, None if user in creators else int(users.get(user, default)))
        for user, membership in members.items()
    }
