"""Unread markers as OZO Tasks (``communication.unread_tasks``, issue 12 point 7), against a
real Synapse and the real HAPI dev server: per thread and member one Task — ``requested``
while the thread's latest message is unread, ``completed`` once their read marker reaches
it (or they posted it), ``cancelled`` when they leave the team; ``focus`` the latest
Communication; only Tasks that change are written again."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests

from devstack.hapi import HapiDevServer
from devstack.matrix_client import MatrixUser
from devstack.synapse import SERVER_NAME
from devstack.waiting import wait_until
from synapse_fhir_module.mapping.unread import OZO_TASK, UNREAD_TASK_SYSTEM
from tests.integration.matrix_views import Team
from tests.integration.quiet_stack import QuietStack, quiet_stack
from tests.integration.test_communication_recording import communication_of
from tests.integration.test_ozo_recording import load_guide, validator_errors
from tests.integration.test_ozo_threads import foreign, put_request, room_of
from tests.ozo_profiles import definition, unmet

WITHIN = 30.0


@pytest.fixture(scope="module")
def stack(run_dir: Path, quiet_hapi: HapiDevServer) -> Iterator[QuietStack]:
    load_guide(quiet_hapi)  # (HAPI's $validate checks what Tasks declare)
    with quiet_stack(
        run_dir / "unread-stack",
        quiet_hapi,
        full_reconcile_interval="1h",
        communication={"profile": "ozo", "unread_tasks": True},
    ) as s:
        yield s


def tasks_of(hapi: HapiDevServer, thread: str) -> dict[str, dict[str, Any]]:
    """The thread's Tasks by owner; fails at once if an owner has two."""
    bundle = requests.get(
        f"{hapi.base_url}/Task",
        params={"based-on": thread, "_count": "100"},
        headers={"Cache-Control": "no-cache"},
        timeout=30,
    ).json()
    by_owner: dict[str, dict[str, Any]] = {}
    for entry in bundle.get("entry", []):
        task = entry["resource"]
        owner = task["owner"]["reference"]
        assert owner not in by_owner, f"two Tasks of {owner} in {thread}"
        by_owner[owner] = task
    return by_owner


def recorded(hapi: HapiDevServer, event_id: str) -> str:
    c = wait_until(
        lambda: communication_of(hapi, event_id),
        timeout=WITHIN,
        what=f"the Communication of {event_id}",
    )
    return f"Communication/{c['id']}"


def tasks_become(
    hapi: HapiDevServer, thread: str, expected: dict[str, tuple[str, str]], what: str
) -> dict[str, dict[str, Any]]:
    """Poll until each owner's Task has the (status, focus) expected; return them all."""

    def matching() -> dict[str, dict[str, Any]] | None:
        tasks = tasks_of(hapi, thread)
        for owner, (status, focus) in expected.items():
            task = tasks.get(owner)
            if task is None or (task["status"], task["focus"]["reference"]) != (status, focus):
                return None
        return tasks

    return wait_until(matching, timeout=WITHIN, what=what)


def mark_read(user: MatrixUser, room_id: str, event_id: str) -> None:
    """What Element does as the user reads: the fully-read marker and the receipt."""
    user.request(
        "POST",
        f"/_matrix/client/v3/rooms/{quote(room_id)}/read_markers",
        {"m.fully_read": event_id, "m.read": event_id},
    )


def last_message(user: MatrixUser, room_id: str, sender: str) -> str | None:
    """The room's newest message event, if ``sender`` sent it."""
    chunk = user.request(
        "GET", f"/_matrix/client/v3/rooms/{quote(room_id)}/messages?dir=b&limit=20"
    )["chunk"]
    newest = next((e for e in chunk if e["type"] == "m.room.message"), None)
    if newest is None or newest["sender"] != sender:
        return None
    return str(newest["event_id"])


def test_each_member_has_one_task_that_follows_what_they_have_read(stack: QuietStack) -> None:
    hapi = stack.hapi
    team = Team(stack)
    team.seed()
    net = team.network
    anna, bram, carla = team.users["anna"], team.users["bram"], team.users["carla"]
    gp, nurse = net.ref("Practitioner", "gp"), net.ref("Practitioner", "nurse")
    daughter, patient = net.ref("RelatedPerson", "daughter"), net.ref("Patient", "patient")
    pharmacist = net.ref("Practitioner", "pharmacist")
    thread = put_request(team, "unread", "active")
    stack.notify(thread)
    room = room_of(anna, thread)
    anna.join(room)
    carla.join(room_of(carla, thread))

    # A message: everyone in the team (the nested pharmacy team's pharmacist too) has a
    # Task pointing at it — open, but for its sender.
    first = anna.send_text(room, "Dressing changed")
    c1 = recorded(hapi, first)
    tasks = tasks_become(
        hapi,
        thread,
        {
            gp: ("completed", c1),
            nurse: ("requested", c1),
            daughter: ("requested", c1),
            patient: ("requested", c1),
            pharmacist: ("requested", c1),
        },
        "a Task per member, focused on the first message",
    )
    assert set(tasks) == {gp, nurse, daughter, patient, pharmacist}
    for owner, task in tasks.items():
        assert task["intent"] == "order"
        assert task["basedOn"] == [{"reference": thread, "type": "CommunicationRequest"}]
        assert task["for"] == {"reference": patient, "type": "Patient"}
        assert task["identifier"] == [{"system": UNREAD_TASK_SYSTEM, "value": f"{thread}/{owner}"}]
    # The OZO profile, where OZOTask allows the owner (a practitioner or related person).
    for owner in (gp, nurse, daughter):
        assert tasks[owner]["meta"]["profile"] == [OZO_TASK]
        assert validator_errors(hapi, tasks[owner]) == []
        assert unmet(tasks[owner], definition("ozo-task")) == []
    assert "profile" not in tasks[patient]["meta"]  # (OZOTask.owner is never a patient)

    # The daughter reads it: her Task is done; nobody else's changes.
    mark_read(carla, room, first)
    read = tasks_become(hapi, thread, {daughter: ("completed", c1)}, "the daughter's read")
    for owner in (gp, nurse, patient, pharmacist):
        assert read[owner]["meta"]["versionId"] == tasks[owner]["meta"]["versionId"], owner

    # She answers: open again for the GP, done for her; focus the answer.
    second = carla.send_text(room, "Thank you")
    c2 = recorded(hapi, second)
    answered = tasks_become(
        hapi,
        thread,
        {
            gp: ("requested", c2),
            daughter: ("completed", c2),
            nurse: ("requested", c2),
            pharmacist: ("requested", c2),
        },
        "the Tasks following the answer",
    )

    # The nurse joins after it; the GP's marker lands on that join (a later event that is
    # no message): she has read the answer.
    bram.join(room_of(bram, thread))
    join = anna.state_event_id(room, "m.room.member", bram.user_id)
    mark_read(anna, room, join)
    done = tasks_become(hapi, thread, {gp: ("completed", c2)}, "the GP's read, past the answer")
    # Only what changed was written again (the join looked at every Task of the room).
    for owner in (nurse, daughter, patient, pharmacist):
        assert done[owner]["meta"]["versionId"] == answered[owner]["meta"]["versionId"], owner

    # The nurse writes from her OZO app (a Communication in FHIR, relayed into the room by
    # the service user): it is the latest, unread for the others, read by her.
    from_app = foreign(team, "from-app", thread, "Visit moved to 3 pm", sender={"reference": nurse})
    stack.notify(from_app)
    tasks_become(
        hapi,
        thread,
        {
            nurse: ("completed", from_app),
            gp: ("requested", from_app),
            daughter: ("requested", from_app),
        },
        "the Tasks following a message relayed from FHIR",
    )
    relayed = wait_until(
        lambda: last_message(carla, room, f"@fhir:{SERVER_NAME}"),  # (the service user)
        timeout=WITHIN,
        what="the relayed message in the room",
    )
    mark_read(carla, room, relayed)
    tasks_become(hapi, thread, {daughter: ("completed", from_app)}, "the daughter's read")

    # The daughter leaves the team: her Task is cancelled, the others stay one each.
    care_team = team.care_team()
    care_team["participant"] = [
        p for p in care_team["participant"] if p["member"]["reference"] != daughter
    ]
    team.put_team(care_team)
    stack.notify(net.team)
    left = tasks_become(
        hapi, thread, {daughter: ("cancelled", from_app)}, "the leaver's Task cancelled"
    )
    assert set(left) == {gp, nurse, daughter, patient, pharmacist}

    # The thread turns out to be entered in error: its room is emptied, every Task cancelled.
    team.fhir.put(team.fhir.read(thread) | {"status": "entered-in-error"})
    stack.notify(thread)
    ended = tasks_become(
        hapi,
        thread,
        {owner: ("cancelled", from_app) for owner in (gp, nurse, daughter, patient, pharmacist)},
        "every Task of a thread entered in error cancelled",
    )
    assert ended[daughter]["meta"]["versionId"] == left[daughter]["meta"]["versionId"]
