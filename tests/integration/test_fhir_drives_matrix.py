"""FHIR drives Matrix (issue 5): a real HAPI whose shim posts to a real Synapse.

Each test seeds its own care network (ids carry a tag) and watches what the members see
through the client API: invites, joins, kicks, the first message of a thread, relayed
Communications.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from devstack.hapi import HapiDevServer
from devstack.matrix_client import MatrixError, MatrixUser, register_user
from devstack.ports import free_port
from devstack.synapse import SynapseServer, module_config
from devstack.waiting import wait_until
from synapse_fhir_module.mapping.relay_content import SHORTENED
from tests.conftest import SERVER_LOGS
from tests.integration.matrix_views import (
    Team,
    invited_space,
    member_invites,
    membership,
    open_invites,
)
from tests.integration.test_communication_recording import communication_of

SECRET = "test-webhook-secret"
# Deadlines that survive a loaded machine: these tests say what happens, not how fast
# (a CareTeam change reaching Matrix within 2 s is suite row 5, bench.membership_sync).
APPLIED_WITHIN = 30.0
FOLLOWS_WITHIN = 30.0


class ShimStack:
    """A HAPI whose shim notifies a Synapse, and that Synapse."""

    def __init__(self, workdir: Path) -> None:
        synapse_port = free_port()
        self.hapi = HapiDevServer(
            workdir / "hapi",
            notify_url=f"http://127.0.0.1:{synapse_port}/_synapse/client/fhir/notify",
            notify_secret=SECRET,
        )
        # A sweep every hour: whatever happens within a test came through the shim.
        self.synapse = SynapseServer(
            workdir / "synapse",
            module_config(self.hapi.base_url, sync={"poll_interval": "1h"}),
            port=synapse_port,
        )
        SERVER_LOGS.extend(
            [self.hapi.process.log_path, self.synapse.log_path, self.synapse.process.log_path]
        )


@pytest.fixture(scope="module")
def stack(run_dir: Path) -> Iterator[ShimStack]:
    stack = ShimStack(run_dir / "shim-stack")
    stack.hapi.start()
    try:
        stack.synapse.start()
        try:
            yield stack
        finally:
            stack.synapse.stop()
    finally:
        stack.hapi.stop()


def joined_space(team: Team, name: str) -> str:
    user = team.users[name]
    space = wait_until(
        lambda: invited_space(user, team.network.team),
        timeout=APPLIED_WITHIN,
        what=f"{name} invited to the team's space",
    )
    user.join(space)
    return space


def test_a_new_care_team_gets_a_space_with_every_member_invited(stack: ShimStack) -> None:
    team = Team(stack)
    team.seed()
    # Within 2 s of the write, each current member has an invite to a space bound to the team.
    spaces = member_invites(team, timeout=APPLIED_WITHIN)
    assert len(set(spaces.values())) == 1, "one space per team"
    space = spaces["anna"]
    # Outsiders, past and inactive participants are not invited.
    for name in ("mallory", "lena"):
        assert invited_space(team.users[name], team.network.team) is None
    team.users["anna"].join(space)
    levels = team.users["anna"].request(
        "GET", f"/_matrix/client/v3/rooms/{space}/state/m.room.power_levels"
    )
    assert levels["users"][team.users["anna"].user_id] == 50  # practitioner
    assert team.users["carla"].user_id not in levels["users"]  # related person: 0


def test_participants_added_and_removed_in_fhir_are_invited_and_kicked(
    stack: ShimStack,
) -> None:
    team = Team(stack)
    team.seed()
    space = joined_space(team, "anna")
    lena = team.users["lena"]

    care_team = team.care_team()
    care_team["participant"].append(
        team.network.participant(team.network.ref("Practitioner", "leaver"))
    )
    team.put_team(care_team)
    wait_until(
        lambda: invited_space(lena, team.network.team) == space,
        timeout=APPLIED_WITHIN,
        what="the new participant invited",
    )
    lena.join(space)

    # Her participation ends: she is removed and cannot come back.
    care_team = team.care_team()
    for participant in care_team["participant"]:
        if participant["member"]["reference"] == team.network.ref("Practitioner", "leaver"):
            participant["period"] = {"end": "2020-01-01"}
    team.put_team(care_team)
    anna = team.users["anna"]
    wait_until(
        lambda: membership(anna, space, lena.user_id) == "leave",
        timeout=APPLIED_WITHIN,
        what="the leaver kicked",
    )
    with pytest.raises(MatrixError) as caught:
        lena.join(space)
    assert caught.value.status == 403


def test_an_inactive_team_is_read_only_and_entered_in_error_empties_it(
    stack: ShimStack,
) -> None:
    team = Team(stack)
    team.seed()
    space = joined_space(team, "anna")
    anna = team.users["anna"]
    anna.send_text(space, "before")

    care_team = team.care_team()
    care_team["status"] = "inactive"
    team.put_team(care_team)

    def refused() -> bool:
        try:
            anna.send_text(space, "still here?")
        except MatrixError as e:
            return e.status == 403
        return False

    wait_until(refused, timeout=APPLIED_WITHIN, what="members no longer able to send")
    # Read-only by the room's power levels (which every server enforces), not only by a
    # callback: sending now takes the service user's level.
    levels = anna.request("GET", f"/_matrix/client/v3/rooms/{space}/state/m.room.power_levels")
    assert levels["events_default"] == 100
    assert levels["users"].get(anna.user_id, levels.get("users_default", 0)) < 100

    care_team = team.care_team()
    care_team["status"] = "entered-in-error"
    team.put_team(care_team)
    service = stack.synapse.user_id("fhir")
    wait_until(
        lambda: membership(team.users["anna"], space, team.users["anna"].user_id) == "leave",
        timeout=APPLIED_WITHIN,
        what="members removed from the space",
    )
    # Pending invites are withdrawn too.
    wait_until(
        lambda: invited_space(team.users["bram"], team.network.team) is None,
        timeout=APPLIED_WITHIN,
        what="bram's invite withdrawn",
    )
    # The service user stays: the space is not abandoned, and nobody else is left.
    members = service_session_members(stack, space)
    assert members == {service: "join"}


def test_a_communication_request_opens_a_room_and_outside_communications_appear_once(
    stack: ShimStack,
) -> None:
    team = Team(stack)
    team.seed()
    space = joined_space(team, "anna")
    anna = team.users["anna"]
    thread, room = request_room(
        team,
        anna,
        category=[{"text": "Wound care"}],
        subject={"reference": team.network.ref("Patient", "patient")},
        payload=[{"contentString": "Please photograph the wound daily"}],
    )
    # Named from the request's category (never from its payload, which can name the patient).
    anna.join(room)
    name = anna.request("GET", f"/_matrix/client/v3/rooms/{room}/state/m.room.name")
    assert name == {"name": "Wound care"}
    # The room hangs off the team's space.
    children = anna.request("GET", f"/_matrix/client/v1/rooms/{space}/hierarchy")["rooms"]
    assert room in [r["room_id"] for r in children]
    assert messages(anna, room) == ["Please photograph the wound daily"]
    bram = team.users["bram"]
    wait_until(lambda: room in open_invites(bram), timeout=FOLLOWS_WITHIN, what="bram invited")
    bram.join(room)

    # Another system writes a Communication in that thread.
    lab = outside_message(team, thread, f"lab-{team.network.tag}", "Photo taken, looks better")
    wait_until(lambda: len(messages(anna, room)) == 2, timeout=FOLLOWS_WITHIN, what="the relay")
    relayed_event = events(anna, room)[1]
    # Posted by the service user, attributed to the FHIR sender — never through the
    # nurse's own account, although she has one in the room (whoever writes FHIR must not
    # be able to make a Matrix user appear to say something).
    assert relayed_event["sender"] == stack.synapse.user_id("fhir")
    nurse = team.network.ref("Practitioner", "nurse")
    assert relayed_event["content"]["com.beeper.per_message_profile"] == {
        "id": nurse,
        # (No name in FHIR: what she is — never a Matrix id a FHIR writer could pick.)
        "displayname": "A practitioner (care record)",
    }
    # Pushed again (a duplicate notification): still once.
    stack.synapse.notify(lab)
    # Anna replies to it.
    reply = anna.send(
        room,
        {
            "msgtype": "m.text",
            "body": "thanks",
            "m.relates_to": {"m.in_reply_to": {"event_id": relayed_event["event_id"]}},
        },
    )
    # The reply is recorded, pointing at the other system's Communication itself...
    recorded = wait_until(
        lambda: communication_of(stack.hapi, reply), timeout=30, what="anna's reply recorded"
    )
    assert recorded["inResponseTo"] == [{"reference": lab, "type": "Communication"}]
    # ...and the relayed message is not echoed back as a second Communication.
    assert communication_of(stack.hapi, relayed_event["event_id"]) is None
    # Neither is the reply's Communication relayed back into the room. A later outside
    # message, changed in FHIR after it, shows whatever the first would have shown.
    outside_message(team, thread, f"lab-later-{team.network.tag}", "Dressing changed")
    wait_until(
        lambda: "A practitioner: Dressing changed" in messages(anna, room),
        timeout=FOLLOWS_WITHIN,
        what="the later relay",
    )
    assert messages(anna, room) == [
        "Please photograph the wound daily",
        "A practitioner: Photo taken, looks better",
        "thanks",
        "A practitioner: Dressing changed",
    ]


def test_a_pushed_body_is_never_trusted(stack: ShimStack) -> None:
    team = Team(stack)
    team.seed()
    joined = joined_space(team, "anna")
    forged = team.care_team()
    forged["participant"].append(
        team.network.participant(team.network.ref("Practitioner", "outsider"))
    )
    response = requests.put(
        stack.synapse.url(f"/_synapse/client/fhir/notify/CareTeam/team-{team.network.tag}"),
        json=forged,
        headers={"Authorization": f"Bearer {SECRET}"},
        timeout=10,
    )
    assert response.status_code == 202
    # A real change afterwards proves the sync ran since; mallory was never invited.
    care_team = team.care_team()
    care_team["participant"].append(
        team.network.participant(team.network.ref("Practitioner", "leaver"))
    )
    team.put_team(care_team)
    wait_until(
        lambda: invited_space(team.users["lena"], team.network.team),
        timeout=APPLIED_WITHIN,
        what="the real change applied",
    )
    # Never invited, not even for a moment (room state keeps a withdrawn invite as
    # "leave"; an initial /sync would not show it).
    anna = team.users["anna"]
    assert membership(anna, joined, anna.user_id) == "join"  # (she can read its state)
    assert membership(anna, joined, team.users["mallory"].user_id) is None


def test_a_person_or_role_changed_in_fhir_resyncs_the_teams_that_list_them(
    stack: ShimStack,
) -> None:
    """No CareTeam write: the nurse's PractitionerRole ends, then the GP's Practitioner is
    made inactive. The shim reports those resources; the sync follows every team listing
    them and removes whom they no longer make members."""
    team = Team(stack)
    team.seed()
    space = joined_space(team, "anna")
    bram = team.users["bram"]  # the nurse, a member through her PractitionerRole
    bram.join(
        wait_until(
            lambda: invited_space(bram, team.network.team),
            timeout=APPLIED_WITHIN,
            what="bram invited",
        )
    )
    role = team.fhir.read(team.network.ref("PractitionerRole", "nurse-role"))
    team.fhir.put({**role, "active": False})
    wait_until(
        lambda: membership(team.users["anna"], space, bram.user_id) == "leave",
        timeout=APPLIED_WITHIN,
        what="the nurse removed once her role ended",
    )
    gp = team.fhir.read(team.network.ref("Practitioner", "gp"))
    team.fhir.put({**gp, "active": False})
    anna = team.users["anna"]
    wait_until(
        lambda: membership(anna, space, anna.user_id) == "leave",
        timeout=APPLIED_WITHIN,
        what="the GP removed once her Practitioner became inactive",
    )


def test_a_request_whose_payload_is_larger_than_an_event_still_opens_its_room(
    stack: ShimStack,
) -> None:
    """Synapse refuses an event over 64 KiB; the opening words are cut to fit, so the room
    opens and gets its members instead of failing on every retry."""
    team = Team(stack)
    team.seed()
    joined_space(team, "anna")
    anna = team.users["anna"]
    long_text = "Wound care plan. " * 8_000  # ~136 KB
    _, room = request_room(team, anna, payload=[{"contentString": long_text}])
    anna.join(room)
    (opening,) = messages(anna, room)
    assert opening.endswith(SHORTENED)
    assert long_text.startswith(opening.removesuffix(SHORTENED))
    bram = team.users["bram"]
    wait_until(lambda: room in open_invites(bram), timeout=FOLLOWS_WITHIN, what="bram invited")


def test_changes_made_while_synapse_is_down_are_applied_after_restart(
    stack: ShimStack,
) -> None:
    team = Team(stack)
    team.seed()
    space = joined_space(team, "anna")
    anna = team.users["anna"]
    thread, room = request_room(team, anna)
    anna.join(room)
    anna.send_text(room, "recorded before the restart")  # (own writes are not swept back)
    # A second team nothing else refers to, so FHIR lets it be deleted.
    solo = f"CareTeam/solo-{team.network.tag}"
    team.fhir.put(
        {
            "resourceType": "CareTeam",
            "id": solo.split("/")[1],
            "status": "active",
            "participant": [team.network.participant(team.network.ref("Practitioner", "gp"))],
        }
    )
    solo_space = wait_until(
        lambda: invited_space(anna, solo), timeout=FOLLOWS_WITHIN, what="the solo team's space"
    )
    anna.join(solo_space)

    stack.synapse.stop()
    try:
        # The shim's posts fail meanwhile: nobody is listening.
        care_team = team.care_team()
        care_team["participant"].append(
            team.network.participant(team.network.ref("Practitioner", "leaver"))
        )
        team.put_team(care_team)
        team.fhir.put(
            {
                "resourceType": "Communication",
                "id": f"while-down-{team.network.tag}",
                "status": "completed",
                "partOf": [{"reference": thread}],
                "sender": {"reference": team.network.ref("Practitioner", "pharmacist")},
                "payload": [{"contentString": "Sent while Matrix was down"}],
            }
        )
        requests.delete(f"{stack.hapi.base_url}/{solo}", timeout=30).raise_for_status()
    finally:
        stack.synapse.start()
    wait_until(
        lambda: invited_space(team.users["lena"], team.network.team) == space,
        timeout=30,
        what="the reconcile sweep at start-up applying the missed membership change",
    )
    wait_until(
        lambda: "Sent while Matrix was down" in " ".join(messages(anna, room)),
        timeout=30,
        what="the missed Communication relayed by the sweep",
    )
    # The deletion, which no search shows, is found in the type's history.
    wait_until(
        lambda: membership(anna, solo_space, anna.user_id) == "leave",
        timeout=30,
        what="the deleted team's space emptied after restart",
    )
    assert messages(anna, room) == [
        "recorded before the restart",
        # The pharmacist has an account but is not in this room: the service user posts it.
        "A practitioner: Sent while Matrix was down",
    ]


def outside_message(team: Team, thread: str, resource_id: str, text: str) -> str:
    """A Communication another system writes into the thread, from the team's nurse."""
    team.fhir.put(
        {
            "resourceType": "Communication",
            "id": resource_id,
            "status": "completed",
            "partOf": [{"reference": thread}],
            "sender": {"reference": team.network.ref("Practitioner", "nurse")},
            "payload": [{"contentString": text}],
        }
    )
    return f"Communication/{resource_id}"


def request_room(team: Team, user: MatrixUser, **fields: Any) -> tuple[str, str]:
    """Write a CommunicationRequest to the team (with ``fields``); its reference and the
    room ``user`` is then invited to for it."""
    thread = f"CommunicationRequest/cr-{team.network.tag}"
    team.fhir.put(
        {
            "resourceType": "CommunicationRequest",
            "id": thread.split("/")[1],
            "status": "active",
            "recipient": [{"reference": team.network.team, "type": "CareTeam"}],
            **fields,
        }
    )
    room = wait_until(
        lambda: next((r for r, ref in open_invites(user).items() if ref == thread), None),
        timeout=FOLLOWS_WITHIN,
        what=f"{user.user_id} invited to a room for the request",
    )
    return thread, room


def service_session_members(stack: ShimStack, room_id: str) -> dict[str, str]:
    """Who is joined or invited, as the service user sees it."""
    admin = register_user(stack.synapse, f"ops_{uuid.uuid4().hex[:8]}", admin=True)
    state = admin.request("GET", f"/_synapse/admin/v1/rooms/{room_id}/state")["state"]
    return {
        e["state_key"]: e["content"]["membership"]
        for e in state
        if e["type"] == "m.room.member" and e["content"]["membership"] in ("join", "invite")
    }


def events(user: MatrixUser, room_id: str) -> list[dict[str, Any]]:
    chunk = user.request("GET", f"/_matrix/client/v3/rooms/{room_id}/messages?dir=f&limit=100")[
        "chunk"
    ]
    return [e for e in chunk if e["type"] == "m.room.message"]


def messages(user: MatrixUser, room_id: str) -> list[str]:
    return [str(e["content"].get("body")) for e in events(user, room_id)]
