"""What no notification tells the module is repaired by the full reconcile (issue 11):
a person made inactive or deleted in FHIR while notifications are lost, power levels or
binding state changed in Matrix behind the module's back.

Own HAPI without the shim (deleting a person others refer to allowed); the sweep runs
once an hour, the full reconcile every few seconds.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests

from devstack.hapi import HapiDevServer
from devstack.matrix_client import MatrixError, MatrixUser, login_as, register_user
from devstack.waiting import wait_until
from synapse_fhir_module.fhir.conventions import EVENT_ID_SYSTEM
from tests.integration.matrix_views import invited_space, membership, open_invites
from tests.integration.quiet_stack import QuietStack, quiet_stack

FULL_RECONCILE = "5s"
# Removal within 60 s of the change (issue 11), here through the full reconcile.
REMOVED_WITHIN = 60.0
FOLLOWS_WITHIN = 30.0
CARE_TEAM_STATE = "org.synapse_fhir.care_team"
THREAD_STATE = "org.synapse_fhir.thread"


@pytest.fixture(scope="module")
def stack(run_dir: Path, quiet_hapi: HapiDevServer) -> Iterator[QuietStack]:
    with quiet_stack(
        run_dir / "drift-stack", quiet_hapi, full_reconcile_interval=FULL_RECONCILE
    ) as stack:
        yield stack


class Network:
    """A team (practitioners anna, bram, carla; mallory outside it) with a thread."""

    def __init__(self, stack: QuietStack) -> None:
        self.stack = stack
        self.tag = uuid.uuid4().hex[:8]
        self.users = {
            name: register_user(stack.synapse, f"{name}_{self.tag}")
            for name in ("anna", "bram", "carla", "mallory")
        }
        self.team = f"CareTeam/team-{self.tag}"
        self.thread = f"CommunicationRequest/thread-{self.tag}"

    def person(self, name: str, resource_type: str = "Practitioner", **extra: Any) -> dict:
        user_id = self.users[name].user_id
        return {
            "resourceType": resource_type,
            "id": f"{name}-{self.tag}",
            "active": True,
            "telecom": [{"system": "url", "value": f"matrix:u/{user_id.removeprefix('@')}"}],
            **extra,
        }

    def seed(self) -> None:
        self.stack.fhir.put_all(
            [
                self.person("anna"),
                self.person("bram"),
                self.person("mallory"),
                self.person("carla"),
                {
                    "resourceType": "CareTeam",
                    "id": self.team.split("/")[1],
                    "status": "active",
                    "participant": [
                        {"member": {"reference": f"Practitioner/{n}-{self.tag}"}}
                        for n in ("anna", "bram", "carla")
                    ],
                },
                {
                    "resourceType": "CommunicationRequest",
                    "id": self.thread.split("/")[1],
                    "status": "active",
                    "recipient": [{"reference": self.team}],
                },
            ]
        )
        self.stack.notify(self.team)
        self.stack.notify(self.thread)

    def join_all(self, *names: str) -> tuple[str, str]:
        """Each of ``names`` joins the space and the thread's room; (space, room)."""
        space = room = ""
        for name in names:
            user = self.users[name]
            space = wait_until(
                lambda u=user: invited_space(u, self.team),
                timeout=FOLLOWS_WITHIN,
                what=f"{name} invited to the space",
            )
            user.join(space)
            room = wait_until(
                lambda u=user: next(
                    (r for r, ref in open_invites(u).items() if ref == self.thread), None
                ),
                timeout=FOLLOWS_WITHIN,
                what=f"{name} invited to the thread's room",
            )
            user.join(room)
        return space, room


def health(stack: QuietStack) -> dict[str, Any]:
    return requests.get(stack.synapse.url("/_synapse/client/fhir/health"), timeout=10).json()


def service_user(stack: QuietStack, tag: str) -> MatrixUser:
    admin = register_user(stack.synapse, f"root_{tag}", admin=True)
    return login_as(admin, stack.synapse.user_id("fhir"))


def test_a_person_made_inactive_or_deleted_without_a_notification_is_removed(
    stack: QuietStack,
) -> None:
    network = Network(stack)
    network.seed()
    space, room = network.join_all("anna", "bram", "carla")
    bram, carla = network.users["bram"], network.users["carla"]

    # Written to FHIR, and the notifications lost (nobody is told).
    stack.fhir.put(network.person("bram") | {"active": False})
    requests.delete(
        f"{stack.hapi.base_url}/Practitioner/carla-{network.tag}", timeout=30
    ).raise_for_status()

    for user in (bram, carla):
        for room_id in (space, room):
            wait_until(
                lambda r=room_id, u=user: membership(u, r, u.user_id) == "leave",
                timeout=REMOVED_WITHIN,
                what=f"{user.user_id} removed from {room_id} by the full reconcile",
            )
    with pytest.raises(MatrixError) as caught:
        bram.join(space)
    assert (caught.value.status, caught.value.reason) == (403, "account_inactive")
    with pytest.raises(MatrixError) as caught:
        carla.join(space)
    assert (caught.value.status, caught.value.reason) == (403, "not_in_care_team")
    assert membership(network.users["anna"], room, network.users["anna"].user_id) == "join"


def test_power_levels_changed_behind_the_modules_back_are_put_back(stack: QuietStack) -> None:
    network = Network(stack)
    network.seed()
    _, room = network.join_all("anna")
    service = service_user(stack, network.tag)
    path = f"/_matrix/client/v3/rooms/{quote(room)}/state/m.room.power_levels/"
    levels = service.request("GET", path)
    assert (levels["kick"], levels["events"]["m.space.parent"]) == (100, 100)
    # An admin acting as the service user lowers what only the service user may do.
    service.request(
        "PUT", path, {**levels, "kick": 0, "events": {**levels["events"], "m.space.parent": 0}}
    )
    wait_until(
        lambda: (lambda now: now["kick"] == 100 and now["events"]["m.space.parent"] == 100)(
            service.request("GET", path)
        ),
        timeout=FOLLOWS_WITHIN,
        what="the reserved power levels restored by the full reconcile",
    )


def test_tampered_binding_state_stays_enforced_and_recorded_and_is_repaired(
    stack: QuietStack,
) -> None:
    network = Network(stack)
    network.seed()
    space, room = network.join_all("anna")
    anna, mallory = network.users["anna"], network.users["mallory"]
    service = service_user(stack, network.tag)
    incidents_before = health(stack)["sync"]["binding_incidents"]

    def put_state(room_id: str, event_type: str, content: dict, state_key: str = "") -> str:
        path = f"/_matrix/client/v3/rooms/{quote(room_id)}/state/{event_type}/{quote(state_key)}"
        return str(service.request("PUT", path, content)["event_id"])

    # Behind the module's back: the room's thread names another request, the space's team
    # binding is emptied, and the space no longer lists the room.
    tampering = [
        (room, put_state(room, THREAD_STATE, {"reference": "CommunicationRequest/other"})),
        (space, put_state(space, CARE_TEAM_STATE, {})),
        (space, put_state(space, "m.space.child", {}, state_key=room)),
    ]

    # Still enforced: an outsider cannot be brought in.
    with pytest.raises(MatrixError) as caught:
        anna.invite(room, mallory.user_id)
    assert (caught.value.status, caught.value.reason) == (403, "not_in_care_team")
    # Still recorded, in its own thread and for its own team.
    event_id = anna.send_text(room, "recorded after the tampering")
    recorded = wait_until(
        lambda: (
            requests.get(
                f"{stack.hapi.base_url}/Communication",
                params={"identifier": f"{EVENT_ID_SYSTEM}|{event_id}"},
                headers={"Cache-Control": "no-cache"},
                timeout=30,
            )
            .json()
            .get("entry")
        ),
        timeout=FOLLOWS_WITHIN,
        what="the message recorded",
    )[0]["resource"]
    assert recorded["partOf"][0]["reference"] == network.thread
    assert recorded["recipient"][0]["reference"] == network.team

    # Repaired by the service user.
    def state(room_id: str, event_type: str, state_key: str = "") -> dict:
        path = f"/_matrix/client/v3/rooms/{quote(room_id)}/state/{event_type}/{quote(state_key)}"
        return dict(service.request("GET", path))

    wait_until(
        lambda: (
            state(room, THREAD_STATE) == {"reference": network.thread}
            and state(space, CARE_TEAM_STATE) == {"reference": network.team}
            and state(space, "m.space.child", room).get("via")
        ),
        timeout=FOLLOWS_WITHIN,
        what="the binding state repaired",
    )
    # Each incident logged with its room and event, and counted.
    log = stack.synapse.log_path.read_text(errors="replace")
    for room_id, event_id in tampering:
        assert any(
            room_id in line and event_id in line and "behind the module's back" in line
            for line in log.splitlines()
        ), f"no incident logged for {event_id} in {room_id}"
    assert health(stack)["sync"]["binding_incidents"] - incidents_before == len(tampering)
    assert membership(anna, room, anna.user_id) == "join"
