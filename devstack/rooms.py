"""Care-team spaces and rooms made the way the module's service user makes them (until the
module creates them itself from FHIR, the tests and the demo act as the service user)."""

from __future__ import annotations

from urllib.parse import quote

from devstack.matrix_client import MatrixUser, login_as
from devstack.waiting import wait_until


def service_session(admin: MatrixUser) -> MatrixUser:
    """A session as the module's service user (@fhir:<server>), once it is registered."""
    service_user = admin.server.user_id("fhir")
    wait_until(
        lambda: admin.request("GET", f"/_synapse/admin/v2/users/{quote(service_user)}"),
        timeout=15,
        what=f"the service user {service_user} registered",
    )
    return login_as(admin, service_user)


def create_bound_space(service: MatrixUser, team_ref: str) -> str:
    """A space bound to ``team_ref``, created the way the module's service user does it."""
    return service.create_room(
        name="Home care team",
        creation_content={"type": "m.space"},
        initial_state=[
            {
                "type": "org.synapse_fhir.care_team",
                "state_key": "",
                "content": {"reference": team_ref},
            }
        ],
    )


def create_room_in_space(service: MatrixUser, space_id: str, *, public: bool = False) -> str:
    """A room listed by the space (m.space.child by the service user) and pointing back."""
    room_id = service.create_room(
        name="Thread",
        preset="public_chat" if public else "private_chat",
        initial_state=[
            {
                "type": "m.space.parent",
                "state_key": space_id,
                "content": {"via": [service.server.server_name], "canonical": True},
            }
        ],
    )
    service.send_state(
        space_id, "m.space.child", {"via": [service.server.server_name]}, state_key=room_id
    )
    return room_id
