"""OZO threads (issue 12, point 5): a CommunicationRequest's status decides its room —
``draft``/``active`` open, ``completed``/``revoked``/``on-hold`` read-only, back to
``active`` writable again, ``entered-in-error`` emptied; a request that arrives closed
gets no room until it is reopened.

The session's quiet HAPI and a Synapse with the sync on; the tests notify by hand. The
change queue applies references one at a time in the order they came, so a later marker
(another request's room) shows that an earlier notification has been applied.
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
from devstack.waiting import wait_until
from synapse_fhir_module.fhir.conventions import EVENT_ID_SYSTEM
from tests.integration.matrix_views import Team, invited_space, open_invites
from tests.integration.quiet_stack import QuietStack, quiet_stack

FOLLOWS_WITHIN = 30.0
SERVICE_LEVEL = 100
PRACTITIONER_LEVEL = 50


@pytest.fixture(scope="module")
def stack(run_dir: Path, quiet_hapi: HapiDevServer) -> Iterator[QuietStack]:
    with quiet_stack(run_dir / "threads-stack", quiet_hapi, full_reconcile_interval="1h") as s:
        yield s


def put_request(team: Team, name: str, status: str, **fields: Any) -> str:
    reference = f"CommunicationRequest/{name}-{team.network.tag}"
    team.fhir.put(
        {
            "resourceType": "CommunicationRequest",
            "id": reference.split("/")[1],
            "status": status,
            "subject": {"reference": team.network.ref("Patient", "patient")},
            "recipient": [{"reference": team.network.team, "type": "CareTeam"}],
            **fields,
        }
    )
    return reference


def room_of(user: MatrixUser, thread: str) -> str:
    return wait_until(
        lambda: next((r for r, ref in open_invites(user).items() if ref == thread), None),
        timeout=FOLLOWS_WITHIN,
        what=f"an invite to the room of {thread}",
    )


def levels(user: MatrixUser, room_id: str) -> dict[str, Any]:
    return dict(
        user.request("GET", f"/_matrix/client/v3/rooms/{room_id}/state/m.room.power_levels")
    )


def read_only(user: MatrixUser, room_id: str) -> bool:
    return bool(levels(user, room_id)["events_default"] == SERVICE_LEVEL)


def refused_to_send(user: MatrixUser, room_id: str) -> bool:
    try:
        user.send_text(room_id, "may I?")
    except MatrixError as e:
        return e.status == 403
    return False


def bodies(user: MatrixUser, room_id: str) -> list[str]:
    chunk = user.request("GET", f"/_matrix/client/v3/rooms/{room_id}/messages?dir=f&limit=100")
    return [str(e["content"]["body"]) for e in chunk["chunk"] if e["type"] == "m.room.message"]


def current_levels(stack: QuietStack, room_id: str) -> dict[str, Any]:
    """The room's power levels now, as a server admin sees them (members may have left)."""
    admin = register_user(stack.synapse, f"ops_{uuid.uuid4().hex[:8]}", admin=True)
    state = admin.request("GET", f"/_synapse/admin/v1/rooms/{room_id}/state")["state"]
    return next(e["content"] for e in state if e["type"] == "m.room.power_levels")


def present(stack: QuietStack, room_id: str) -> dict[str, str]:
    """Who is joined or invited, as a server admin sees it."""
    admin = register_user(stack.synapse, f"ops_{uuid.uuid4().hex[:8]}", admin=True)
    state = admin.request("GET", f"/_synapse/admin/v1/rooms/{room_id}/state")["state"]
    return {
        e["state_key"]: e["content"]["membership"]
        for e in state
        if e["type"] == "m.room.member" and e["content"]["membership"] in ("join", "invite")
    }


def test_a_threads_status_opens_closes_reopens_and_empties_its_room(stack: QuietStack) -> None:
    team = Team(stack)
    team.seed()
    anna, bram, lena = team.users["anna"], team.users["bram"], team.users["lena"]
    thread = put_request(team, "thread", "active", payload=[{"contentString": "Wound care"}])
    stack.notify(thread)
    room = room_of(anna, thread)
    anna.join(room)
    bram.join(room_of(bram, thread))
    assert levels(anna, room)["events_default"] == 0
    assert levels(anna, room)["users"][anna.user_id] == PRACTITIONER_LEVEL
    anna.send_text(room, "open")

    # Completed: read-only. Nobody but the service user holds a level; members still read.
    team.fhir.put(team.fhir.read(thread) | {"status": "completed"})
    stack.notify(thread)
    wait_until(lambda: read_only(anna, room), timeout=FOLLOWS_WITHIN, what="read-only")
    closed = levels(anna, room)
    # (The service user created the room: in room v12 it holds power without a listing.)
    assert set(closed["users"]) <= {stack.synapse.user_id("fhir")}
    assert closed["events_default"] == SERVICE_LEVEL
    assert refused_to_send(anna, room)
    assert bodies(anna, room) == ["Wound care", "open"]

    # A sync of the team meanwhile keeps the thread closed, and invites nobody new to it:
    # lena joins the team (her space invite shows the team was synced), then a marker
    # request opened after it shows the team's rooms were all done.
    care_team = team.care_team()
    care_team["participant"].append(
        team.network.participant(team.network.ref("Practitioner", "leaver"))
    )
    team.put_team(care_team)
    stack.notify(team.network.team)
    marker = put_request(team, "marker", "active")
    stack.notify(marker)
    wait_until(lambda: invited_space(lena, team.network.team), timeout=FOLLOWS_WITHIN, what="lena")
    room_of(lena, marker)
    assert read_only(anna, room)
    assert lena.user_id not in present(stack, room)

    # Active again: writable, levels back, and lena (a member now) is invited.
    team.fhir.put(team.fhir.read(thread) | {"status": "active"})
    stack.notify(thread)
    wait_until(lambda: not read_only(anna, room), timeout=FOLLOWS_WITHIN, what="reopened")
    assert levels(anna, room)["users"][anna.user_id] == PRACTITIONER_LEVEL
    anna.send_text(room, "reopened")
    assert room_of(lena, thread) == room

    # On hold: read-only again; leaving is still allowed.
    team.fhir.put(team.fhir.read(thread) | {"status": "on-hold"})
    stack.notify(thread)
    wait_until(lambda: read_only(anna, room), timeout=FOLLOWS_WITHIN, what="on hold")
    assert refused_to_send(bram, room)
    bram.leave(room)

    # Entered in error: everyone but the service user is removed, invites withdrawn.
    team.fhir.put(team.fhir.read(thread) | {"status": "entered-in-error"})
    stack.notify(thread)
    service = stack.synapse.user_id("fhir")
    wait_until(
        lambda: present(stack, room) == {service: "join"},
        timeout=FOLLOWS_WITHIN,
        what="the room emptied",
    )
    # Nobody is admitted afterwards.
    with pytest.raises(MatrixError):
        anna.join(room)


def test_entered_in_error_is_final_and_a_deleted_request_empties_its_room(
    stack: QuietStack,
) -> None:
    team = Team(stack)
    team.seed()
    anna = team.users["anna"]
    service = stack.synapse.user_id("fhir")
    wrong = put_request(team, "wrong", "active", payload=[{"contentString": "Wrong patient"}])
    stack.notify(wrong)
    wrong_room = room_of(anna, wrong)
    anna.join(wrong_room)
    team.fhir.put(team.fhir.read(wrong) | {"status": "entered-in-error"})
    stack.notify(wrong)
    wait_until(
        lambda: present(stack, wrong_room) == {service: "join"},
        timeout=FOLLOWS_WITHIN,
        what="the room of the request entered in error emptied",
    )
    # Set back to active (a replayed old version, a slip): the history stays hidden.
    team.fhir.put(team.fhir.read(wrong) | {"status": "active"})
    stack.notify(wrong)
    deleted = put_request(team, "deleted", "active")
    stack.notify(deleted)
    deleted_room = room_of(anna, deleted)  # (applied after the reactivation)
    anna.join(deleted_room)
    assert present(stack, wrong_room) == {service: "join"}
    assert wrong not in open_invites(anna).values()
    assert current_levels(stack, wrong_room)["events_default"] == SERVICE_LEVEL

    # A deleted request: its room is emptied too (whatever it was, it is no more).
    response = requests.delete(f"{stack.hapi.base_url}/{deleted}", timeout=30)
    assert response.status_code in (200, 204), response.text
    stack.notify(deleted)
    wait_until(
        lambda: present(stack, deleted_room) == {service: "join"},
        timeout=FOLLOWS_WITHIN,
        what="the room of the deleted request emptied",
    )


@pytest.mark.parametrize("status", ["completed", "on-hold", "revoked", "entered-in-error"])
def test_a_request_that_arrives_closed_gets_no_room_until_reopened(
    stack: QuietStack, status: str
) -> None:
    team = Team(stack)
    team.seed()
    anna = team.users["anna"]
    closed = put_request(team, "closed", status, payload=[{"contentString": "History"}])
    stack.notify(closed)
    marker = put_request(team, "marker", "draft")
    stack.notify(marker)
    room_of(anna, marker)  # (applied after the closed one)
    assert closed not in open_invites(anna).values()

    team.fhir.put(team.fhir.read(closed) | {"status": "active"})
    stack.notify(closed)
    room = room_of(anna, closed)
    anna.join(room)
    assert bodies(anna, room) == ["History"]
    assert levels(anna, room)["events_default"] == 0


def test_a_requests_payload_is_posted_first_part_by_part_in_order(stack: QuietStack) -> None:
    team = Team(stack)
    team.seed()
    anna = team.users["anna"]
    thread = put_request(
        team,
        "payload",
        "active",
        payload=[
            {"contentString": "Please photograph the wound daily"},
            {"contentAttachment": {"title": "Care plan", "url": "https://files.example/plan"}},
            {"contentAttachment": {"title": "scan", "url": "ftp://files.example/scan"}},
            {
                "contentAttachment": {
                    "title": "wound.png",
                    "url": "mxc://example.org/wound1",
                    "contentType": "image/png",
                    "size": 1024,
                }
            },
            {
                "contentAttachment": {
                    "title": "inline",
                    "data": "aGVsbG8=",
                    "contentType": "text/plain",
                }
            },
            {"contentString": "Call me if it gets worse"},
        ],
    )
    stack.notify(thread)
    room = room_of(anna, thread)
    anna.join(room)
    timeline = anna.request("GET", f"/_matrix/client/v3/rooms/{room}/messages?dir=f&limit=100")[
        "chunk"
    ]
    posted = [e for e in timeline if e["type"] == "m.room.message"]
    assert [(e["content"]["msgtype"], e["content"]["body"]) for e in posted] == [
        ("m.text", "Please photograph the wound daily"),
        ("m.text", "Attachment: Care plan https://files.example/plan"),
        ("m.image", "wound.png"),
        ("m.text", "Call me if it gets worse"),
    ]
    assert {e["sender"] for e in posted} == {stack.synapse.user_id("fhir")}
    assert posted[2]["content"]["url"] == "mxc://example.org/wound1"
    assert posted[2]["content"]["info"] == {"mimetype": "image/png", "size": 1024}
    # First: before anybody was invited.
    invites = [
        i
        for i, e in enumerate(timeline)
        if e["type"] == "m.room.member" and e["content"]["membership"] == "invite"
    ]
    assert timeline.index(posted[-1]) < min(invites)

    # Applied again (a duplicate notification, then a change): nothing is posted twice.
    stack.notify(thread)
    team.fhir.put(team.fhir.read(thread) | {"status": "completed"})
    stack.notify(thread)
    wait_until(lambda: read_only(anna, room), timeout=FOLLOWS_WITHIN, what="read-only")
    assert len(bodies(anna, room)) == len(posted)


def recorded(stack: QuietStack, event_id: str) -> dict[str, Any] | None:
    bundle = requests.get(
        f"{stack.hapi.base_url}/Communication",
        params={"identifier": f"{EVENT_ID_SYSTEM}|{event_id}"},
        headers={"Cache-Control": "no-cache"},
        timeout=30,
    ).json()
    entries = bundle.get("entry", [])
    return entries[0]["resource"] if entries else None


def foreign(team: Team, name: str, thread: str, text: str, **fields: Any) -> str:
    """A Communication as another system (OZO) writes one: no identifier, no ``sent``."""
    reference = f"Communication/{name}-{team.network.tag}"
    team.fhir.put(
        {
            "resourceType": "Communication",
            "id": reference.split("/")[1],
            "status": "in-progress",
            "partOf": [{"reference": thread, "type": "CommunicationRequest"}],
            "recipient": [{"reference": team.network.team, "type": "CareTeam"}],
            "sender": {"reference": team.network.ref("RelatedPerson", "daughter")},
            "payload": [{"contentString": text}],
            **fields,
        }
    )
    return reference


def test_foreign_communications_are_relayed_once_in_fhir_order_as_replies(
    stack: QuietStack,
) -> None:
    team = Team(stack)
    team.seed()
    anna = team.users["anna"]
    thread = put_request(team, "replies", "active")
    stack.notify(thread)
    room = room_of(anna, thread)
    anna.join(room)
    question = anna.send_text(room, "How is the wound today?")
    mine = wait_until(lambda: recorded(stack, question), timeout=FOLLOWS_WITHIN, what="recorded")

    # Written while Matrix hears nothing (an outage); ids sort against FHIR's order.
    first = foreign(
        team, "zz", thread, "Better", inResponseTo=[{"reference": f"Communication/{mine['id']}"}]
    )
    foreign(team, "mm", thread, "Photo follows", inResponseTo=[{"reference": first}])
    foreign(team, "gone", thread, "Wrong thread", status="entered-in-error")
    # Carries the module's event-id identifier (its tag stripped on the way): never echoed.
    foreign(
        team,
        "echo",
        thread,
        "An echo",
        identifier=[{"system": EVENT_ID_SYSTEM, "value": "$not-relayed"}],
    )
    last = foreign(
        team,
        "aa",
        thread,
        "Anything else?",
        inResponseTo=[{"reference": f"Communication?identifier={EVENT_ID_SYSTEM}|{question}"}],
    )
    # Only the newest is notified: the older ones still waiting come first.
    stack.notify(last)

    def relayed() -> list[dict[str, Any]]:
        chunk = anna.request("GET", f"/_matrix/client/v3/rooms/{room}/messages?dir=f&limit=100")
        return [e for e in chunk["chunk"] if e["type"] == "m.room.message"]

    wait_until(lambda: len(relayed()) >= 4, timeout=FOLLOWS_WITHIN, what="the relays")
    # Notified again, each of them: nothing twice.
    for name in ("zz", "mm", "gone", "echo", "aa"):
        stack.notify(f"Communication/{name}-{team.network.tag}")
    marker = put_request(team, "after", "active")
    stack.notify(marker)
    room_of(anna, marker)  # (the notifications above were applied before it)
    events = relayed()
    assert [e["content"]["body"] for e in events] == [
        "How is the wound today?",
        "A related person: Better",
        "A related person: Photo follows",
        "A related person: Anything else?",
    ]
    replies = [e["content"].get("m.relates_to") for e in events[1:]]
    assert replies == [
        {"m.in_reply_to": {"event_id": question}},  # a recorded message, by its id
        {"m.in_reply_to": {"event_id": events[1]["event_id"]}},  # a relayed one
        {"m.in_reply_to": {"event_id": question}},  # by the recorder's conditional reference
    ]


SENDER_CARETEAM = "http://ozoverbindzorg.nl/fhir/StructureDefinition/ozo-sender-careteam"


def hierarchy(user: MatrixUser, space: str) -> set[str]:
    rooms = user.request("GET", f"/_matrix/client/v1/rooms/{space}/hierarchy")["rooms"]
    return {r["room_id"] for r in rooms} - {space}


def test_a_thread_addressed_to_two_teams_is_shared_by_both(stack: QuietStack) -> None:
    team = Team(stack)
    team.seed()
    anna, lena, mallory = team.users["anna"], team.users["lena"], team.users["mallory"]
    clinic = f"CareTeam/clinic-{team.network.tag}"
    team.fhir.put(
        {
            "resourceType": "CareTeam",
            "id": clinic.split("/")[1],
            "status": "active",
            "participant": [
                team.network.participant(team.network.ref("Practitioner", "leaver")),
                team.network.participant(team.network.ref("Practitioner", "outsider")),
            ],
        }
    )
    # OZO: the home team addressed, the clinic the team that opened it and gets the replies.
    sender = {"url": SENDER_CARETEAM, "valueReference": {"reference": clinic, "type": "CareTeam"}}
    thread = put_request(team, "shared", "active", extension=[sender])
    stack.notify(thread)
    room = room_of(anna, thread)
    assert room_of(lena, thread) == room
    assert room_of(mallory, thread) == room
    # Listed in each team's space.
    home_space = wait_until(
        lambda: invited_space(anna, team.network.team), timeout=FOLLOWS_WITHIN, what="home"
    )
    clinic_space = wait_until(
        lambda: invited_space(lena, clinic), timeout=FOLLOWS_WITHIN, what="clinic space"
    )
    anna.join(home_space)
    lena.join(clinic_space)
    assert room in hierarchy(anna, home_space)
    assert room in hierarchy(lena, clinic_space)
    # A member of either team enters and speaks.
    anna.join(room)
    lena.join(room)
    from_clinic = lena.send_text(room, "From the clinic")
    anna.send_text(room, "From home")
    # Recorded addressed to both teams, the one the room was made for first.
    written = wait_until(
        lambda: recorded(stack, from_clinic), timeout=FOLLOWS_WITHIN, what="recorded"
    )
    assert [r["reference"] for r in written["recipient"]] == [team.network.team, clinic]
    assert written["partOf"][0]["reference"] == thread

    # Each team's own sync keeps the other team's members (no tug of war), and the
    # listings stay.
    stack.notify(team.network.team)
    stack.notify(clinic)
    marker = put_request(team, "after-sync", "active")
    stack.notify(marker)
    room_of(anna, marker)
    members = present(stack, room)
    assert members[lena.user_id] == "join" and members[anna.user_id] == "join"
    assert room in hierarchy(lena, clinic_space)

    # The clinic dropped from the request: its members leave, its space unlists the room.
    team.fhir.put({k: v for k, v in team.fhir.read(thread).items() if k != "extension"})
    stack.notify(thread)
    wait_until(
        lambda: lena.user_id not in present(stack, room),
        timeout=FOLLOWS_WITHIN,
        what="lena removed",
    )
    assert mallory.user_id not in present(stack, room)
    assert present(stack, room)[anna.user_id] == "join"
    assert room not in hierarchy(lena, clinic_space)
    with pytest.raises(MatrixError):
        lena.join(room)

    # Readdressed to the clinic only: the room stays with the home team it was made for
    # (anna stays), and the clinic's members are back.
    request = team.fhir.read(thread)
    request["recipient"] = [{"reference": clinic, "type": "CareTeam"}]
    team.fhir.put(request)
    stack.notify(thread)
    assert room_of(lena, thread) == room
    assert present(stack, room)[anna.user_id] == "join"
    assert room in hierarchy(anna, home_space)
    wait_until(
        lambda: room in hierarchy(lena, clinic_space), timeout=FOLLOWS_WITHIN, what="relisted"
    )
