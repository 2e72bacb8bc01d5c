"""communication.profile: ozo against a real Synapse and the real HAPI dev server: every
Communication the module writes, and the thread it opens, meets the OZO guide's profiles —
checked on what HAPI gives back three ways: HAPI's own validator (``$validate``) with the
guide's StructureDefinitions loaded into it, the definitions' cardinalities and types read
directly (``tests/ozo_profiles``; both from ../shared/ozo at test time), and the R4B models."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
import requests
from fhir.resources.R4B.communication import Communication
from fhir.resources.R4B.communicationrequest import CommunicationRequest

from devstack.fhir_seed import FhirSeeder
from devstack.hapi import HapiDevServer
from devstack.matrix_client import MatrixError, MatrixUser, register_user
from devstack.rooms import create_bound_space, create_room_in_space, service_session
from devstack.synapse import SERVER_NAME, SynapseServer, module_config
from devstack.waiting import wait_until
from synapse_fhir_module.config import CommunicationProfile
from synapse_fhir_module.fhir.conventions import ROOM_ID_SYSTEM
from synapse_fhir_module.mapping.communication import ENCRYPTED_TAG, thread_request
from synapse_fhir_module.mapping.profile import (
    ENCRYPTED_PLACEHOLDER,
    OZO_COMMUNICATION,
    OZO_COMMUNICATION_REQUEST,
    WITHDRAWN_PLACEHOLDER,
)
from tests.integration.care_network import CareNetwork, via_identifier
from tests.integration.test_authorship import edit
from tests.integration.test_communication_recording import (
    RETRY_DEAD_LETTERS,
    communication_of,
    dead_letters,
    health,
)
from tests.ozo_profiles import (
    COMMUNICATION,
    COMMUNICATION_REQUEST,
    definition,
    guide_resources,
    unmet,
)

OZO = CommunicationProfile.OZO
SECRET = "test-webhook-secret"  # devstack.synapse.module_config's webhook secret
MEGOLM = {
    "algorithm": "m.megolm.v1.aes-sha2",
    "ciphertext": "AwgAEnACgAkLmt6qF84IK++J7UDH2Za1YVchHyprqTqsg",
    "device_id": "RJYKSTBOIE",
    "sender_key": "IlRMeOPX2e0MurIyfWEucYBRVOEEUMrOHqn/8mLqMjA",
    "session_id": "X3lUlvLELLYxeTx4yOVu6UDpasGEVO0Jbu+QFnm0cKQ",
}


@pytest.fixture(scope="module")
def ozo_hapi(hapi: HapiDevServer) -> HapiDevServer:
    """The session's HAPI, holding the guide's profiles so that ``$validate`` checks a
    resource against those it declares (nothing else changes: HAPI validates on request
    only)."""
    load_guide(hapi)
    return hapi


def load_guide(hapi: HapiDevServer) -> None:
    """The guide's StructureDefinitions and ValueSets, into ``hapi``."""
    for conformance in guide_resources():
        response = requests.put(
            f"{hapi.base_url}/{conformance['resourceType']}/{conformance['id']}",
            json=conformance,
            headers={"Content-Type": "application/fhir+json"},
            timeout=60,
        )
        assert response.status_code in (200, 201), response.text[:500]


def validator_errors(hapi: HapiDevServer, resource: dict[str, Any]) -> list[str]:
    """HAPI's errors for ``resource``, validated against the profiles it declares."""
    response = requests.post(
        f"{hapi.base_url}/{resource['resourceType']}/$validate",
        json=resource,
        headers={"Content-Type": "application/fhir+json"},
        timeout=300,  # (the first one generates the profiles' snapshots)
    )
    return [
        str(issue.get("diagnostics", ""))
        for issue in response.json().get("issue", [])
        if issue.get("severity") in ("error", "fatal")
    ]


def ozo_server(
    start_synapse: Callable[..., SynapseServer], hapi: HapiDevServer, **extra: Any
) -> SynapseServer:
    return start_synapse(
        module_config(hapi.base_url, communication={"profile": "ozo"}, **extra), metrics=True
    )


def resource(hapi: HapiDevServer, reference: str) -> dict[str, Any]:
    response = requests.get(
        f"{hapi.base_url}/{reference}", headers={"Cache-Control": "no-cache"}, timeout=30
    )
    response.raise_for_status()
    return dict(response.json())


def written(hapi: HapiDevServer, event_id: str, condition: Any = bool, what: str = "") -> dict:
    """The event's Communication as HAPI holds it, once ``condition`` holds for it."""
    return dict(
        wait_until(
            lambda: (c := communication_of(hapi, event_id)) and condition(c) and c,
            timeout=30,
            what=what or f"the Communication of {event_id}",
        )
    )


def assert_ozo_communication(hapi: HapiDevServer, c: dict[str, Any]) -> None:
    """What HAPI returns declares OZOCommunication and meets it (HAPI's validator, the
    guide's definition read directly), and is a valid R4 Communication."""
    assert c["meta"]["profile"] == [OZO_COMMUNICATION]
    assert validator_errors(hapi, c) == []
    assert unmet(c, definition(COMMUNICATION)) == []
    Communication.model_validate(c)


def assert_ozo_thread(
    hapi: HapiDevServer, request: dict[str, Any], network: CareNetwork, requester: str
) -> None:
    assert request["meta"]["profile"] == [OZO_COMMUNICATION_REQUEST]
    assert validator_errors(hapi, request) == []
    assert unmet(request, definition(COMMUNICATION_REQUEST)) == []
    CommunicationRequest.model_validate(request)
    assert request["status"] == "active"
    assert request["subject"] == {"reference": network.ref("Patient", "patient"), "type": "Patient"}
    assert request["requester"] == {"reference": requester, "type": requester.split("/")[0]}
    assert request["recipient"] == [{"reference": network.team, "type": "CareTeam"}]


def metric(server: SynapseServer, line_start: str) -> float | None:
    assert server.metrics_url is not None
    for line in requests.get(server.metrics_url, timeout=10).text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return None


def joined(server: SynapseServer, inviter: MatrixUser, room: str, localpart: str) -> MatrixUser:
    user = register_user(server, localpart)
    inviter.invite(room, user.user_id)
    user.join(room)
    return user


def room_made_by(creator: MatrixUser, service: MatrixUser, space: str) -> str:
    """A room a member makes, which the team's space then lists (as the service user)."""
    via = {"via": [SERVER_NAME]}
    room = creator.create_room(
        name="Wound care",
        preset="private_chat",
        initial_state=[
            {"type": "m.space.parent", "state_key": space, "content": {**via, "canonical": True}}
        ],
    )
    service.send_state(space, "m.space.child", via, state_key=room)
    return room


def test_a_conversation_in_a_room_a_member_made_is_recorded_as_ozo_resources(
    ozo_hapi: HapiDevServer, start_synapse: Callable[..., SynapseServer]
) -> None:
    hapi = ozo_hapi
    network = CareNetwork(uuid.uuid4().hex[:8])
    audit_id = network.user_id("audit")  # no FHIR person (yet)
    bot_id = network.user_id("bot")  # exempt from the care-team rules, never a person
    # (Enforcement off: with it, someone without a person could not join the room.)
    server = ozo_server(
        start_synapse, hapi, enforcement={"enabled": False, "exempt_users": [bot_id]}
    )
    seeder = FhirSeeder(hapi.base_url)
    network.seed(seeder)
    ops = register_user(server, network.localpart("ops"), admin=True)
    service = service_session(register_user(server, network.localpart("root"), admin=True))
    space = create_bound_space(service, network.team)
    gp = register_user(server, network.localpart("anna"))
    room = room_made_by(gp, service, space)
    daughter = joined(server, gp, room, network.localpart("carla"))
    audit = joined(server, gp, room, network.localpart("audit"))
    bot = joined(server, gp, room, network.localpart("bot"))

    # A message: the module opens the room's thread, requested by the room's creator.
    first = gp.send_text(room, "Wound looks clean")
    c = written(hapi, first)
    assert_ozo_communication(hapi, c)
    assert c["status"] == "completed"
    assert c["payload"] == [{"contentString": "Wound looks clean"}]
    assert c["sender"] == {"reference": network.ref("Practitioner", "gp"), "type": "Practitioner"}
    (part_of,) = c["partOf"]
    assert part_of["type"] == "CommunicationRequest"
    thread = resource(hapi, part_of["reference"])
    assert thread["identifier"] == [{"system": ROOM_ID_SYSTEM, "value": room}]
    assert_ozo_thread(hapi, thread, network, requester=network.ref("Practitioner", "gp"))

    # A reply, by the daughter (a RelatedPerson).
    reply = daughter.send(
        room,
        {
            "msgtype": "m.text",
            "body": "> Wound looks clean\n\nThank you",
            "m.relates_to": {"m.in_reply_to": {"event_id": first}},
        },
    )
    r = written(hapi, reply)
    assert_ozo_communication(hapi, r)
    # (By the conditional reference when both were written together, else by its id.)
    assert [p["reference"] for p in r["inResponseTo"]] == [f"Communication/{c['id']}"]
    assert r["sender"] == {
        "reference": network.ref("RelatedPerson", "daughter"),
        "type": "RelatedPerson",
    }
    assert r["partOf"] == c["partOf"]

    # An edit by its sender: a new version, still declaring and meeting the profile.
    edit(gp, room, first, "Wound looks clean, dressing changed")
    edited = written(
        hapi,
        first,
        lambda x: x["payload"] == [{"contentString": "Wound looks clean, dressing changed"}],
        "the edit applied",
    )
    assert_ozo_communication(hapi, edited)
    assert edited["id"] == c["id"] and edited["meta"]["versionId"] != c["meta"]["versionId"]

    # A redaction: withdrawn, with the fixed placeholder as its payload.
    mistake = gp.send_text(room, "Wrong patient, sorry")
    written(hapi, mistake)
    gp.redact(room, mistake)
    withdrawn = written(
        hapi, mistake, lambda x: x["status"] == "entered-in-error", "the redaction applied"
    )
    assert_ozo_communication(hapi, withdrawn)
    assert withdrawn["payload"] == [{"contentString": WITHDRAWN_PLACEHOLDER}]
    # (Without it — as under base — HAPI's validator would refuse the profile's claim.)
    bare = {key: value for key, value in withdrawn.items() if key != "payload"}
    assert any("payload" in error for error in validator_errors(hapi, bare))

    # An encrypted event (metadata_only): the encryption placeholder.
    secret = gp.send(room, MEGOLM, "m.room.encrypted")
    e = written(hapi, secret)
    assert_ozo_communication(hapi, e)
    assert e["payload"] == [{"contentString": ENCRYPTED_PLACEHOLDER}]
    assert ENCRYPTED_TAG in e["meta"]["tag"]

    # A message by someone without a FHIR person (yet): kept as a dead letter, durably
    # counted, to be written once FHIR names one. One by the service user in the team's
    # space, and one by the exempt bot, can never have a person: not written, counted.
    unattributable = audit.send_text(room, "Audit check")
    by_service = service.send_text(space, "Maintenance tonight")
    by_bot = bot.send_text(room, "Reminder: rounds at 9")
    (dead,) = wait_until(
        lambda: [d for d in dead_letters(ops) if d["event_id"] == unattributable] or None,
        timeout=30,
        what="the message of the account without a person kept as a dead letter",
    )
    assert dead["reason"] == "the sender has no (single) FHIR person"
    wait_until(
        lambda: health(server)["recording"] == {"not_written_profile": 2},
        timeout=30,
        what="the service user's and the bot's messages counted as not written",
    )
    assert communication_of(hapi, unattributable) is None
    assert communication_of(hapi, by_service) is None
    assert communication_of(hapi, by_bot) is None
    assert health(server)["outbox"] == {"pending": 0, "dead": 1}
    not_written = "synapse_fhir_communications_not_written_total"
    assert metric(server, f'{not_written}{{reason="no_person"}}') is None
    assert metric(server, f'{not_written}{{reason="service_user"}}') == 1.0
    assert metric(server, f'{not_written}{{reason="exempt_user"}}') == 1.0
    # The recorder's log names the events and the rooms only.
    log = [
        line
        for line in server.log_path.read_text(errors="replace").splitlines()
        if "synapse_fhir_module.recording.recorder" in line
    ]
    lines = [line for line in log if by_service in line and "not written" in line]
    assert lines and all(space in line for line in lines)
    assert [line for line in log if unattributable in line and "dead letter" in line]
    assert not any(audit_id in line or "Audit check" in line for line in log)
    assert not any(bot_id in line or "rounds at 9" in line for line in log)
    # Every Communication in the thread declares and meets the profile.
    bundle = requests.get(
        f"{hapi.base_url}/Communication",
        params={"part-of": part_of["reference"]},
        headers={"Cache-Control": "no-cache"},
        timeout=30,
    ).json()
    in_thread = [entry["resource"] for entry in bundle["entry"]]
    assert len(in_thread) == 4  # first, reply, mistake, secret
    for communication in in_thread:
        assert_ozo_communication(hapi, communication)

    # FHIR names the audit account's person; the operator retries: nothing was lost.
    auditor = network.person("Practitioner", "auditor", via_identifier(network.localpart("audit")))
    seeder.put(auditor)
    assert ops.request("POST", RETRY_DEAD_LETTERS, {"event_ids": [unattributable]}) == {
        "requeued": 1
    }
    a = written(hapi, unattributable)
    assert_ozo_communication(hapi, a)
    assert a["sender"] == {
        "reference": network.ref("Practitioner", "auditor"),
        "type": "Practitioner",
    }
    assert a["partOf"] == c["partOf"]
    assert health(server)["outbox"] == {"pending": 0, "dead": 0}


def test_the_thread_of_a_room_the_service_user_made_is_requested_by_its_first_writer(
    ozo_hapi: HapiDevServer, start_synapse: Callable[..., SynapseServer]
) -> None:
    hapi = ozo_hapi
    server = ozo_server(start_synapse, hapi)
    network = CareNetwork(uuid.uuid4().hex[:8])
    network.seed(FhirSeeder(hapi.base_url))
    service = service_session(register_user(server, network.localpart("root"), admin=True))
    room = create_room_in_space(service, create_bound_space(service, network.team))
    daughter = joined(server, service, room, network.localpart("carla"))
    gp = joined(server, service, room, network.localpart("anna"))

    first = daughter.send_text(room, "Dad slept badly")
    c = written(hapi, first)
    assert_ozo_communication(hapi, c)
    thread = resource(hapi, c["partOf"][0]["reference"])
    # The service user, who made the room, is no person: whoever opened the conversation is.
    assert_ozo_thread(hapi, thread, network, requester=network.ref("RelatedPerson", "daughter"))
    # (and the room is bound to it)
    assert service.request(
        "GET", f"/_matrix/client/v3/rooms/{room}/state/org.synapse_fhir.thread"
    ) == {"reference": c["partOf"][0]["reference"]}
    later = gp.send_text(room, "I will call this afternoon")
    assert written(hapi, later)["partOf"] == c["partOf"]
    assert resource(hapi, c["partOf"][0]["reference"])["requester"] == thread["requester"]


def test_a_team_without_a_patient_gets_no_thread_until_fhir_names_one(
    ozo_hapi: HapiDevServer, start_synapse: Callable[..., SynapseServer]
) -> None:
    hapi = ozo_hapi
    server = ozo_server(start_synapse, hapi)
    network = CareNetwork(uuid.uuid4().hex[:8])
    seeder = FhirSeeder(hapi.base_url)
    resources = network.resources()
    team = next(
        r for r in resources if r["resourceType"] == "CareTeam" and r["id"].startswith("team-")
    )
    subject = team.pop("subject")
    seeder.put_all(resources)
    ops = register_user(server, network.localpart("ops"), admin=True)
    service = service_session(register_user(server, network.localpart("root"), admin=True))
    room = create_room_in_space(service, create_bound_space(service, network.team))
    gp = joined(server, service, room, network.localpart("anna"))

    message = gp.send_text(room, "Who is this team for?")
    (dead,) = wait_until(
        lambda: [d for d in dead_letters(ops) if d["event_id"] == message] or None,
        timeout=30,
        what="the message kept as a dead letter",
    )
    assert "names no Patient" in dead["reason"]
    assert communication_of(hapi, message) is None
    threads = requests.get(
        f"{hapi.base_url}/CommunicationRequest",
        params={"identifier": f"{ROOM_ID_SYSTEM}|{room}"},
        headers={"Cache-Control": "no-cache"},
        timeout=30,
    ).json()
    assert threads.get("entry", []) == []  # no thread that could not meet the profile
    # (Which it could not: HAPI's validator refuses that thread for want of its subject.)
    refused = thread_request(
        room, network.team, None, requester=network.ref("Practitioner", "gp"), profile=OZO
    )
    assert any("subject" in error for error in validator_errors(hapi, refused))

    # FHIR names the team's patient; the operator retries the dead letter.
    seeder.put({**team, "subject": subject})
    response = requests.post(
        server.url("/_synapse/client/fhir/notify"),
        json={"resourceType": "CareTeam", "id": team["id"], "versionId": "2", "action": "update"},
        headers={"Authorization": f"Bearer {SECRET}"},
        timeout=10,
    )
    assert response.status_code == 202

    def retried() -> dict[str, Any] | None:
        if any(d["event_id"] == message for d in dead_letters(ops)):
            # (Again, should the retry have come before the notification was applied.)
            ops.request("POST", RETRY_DEAD_LETTERS, {"event_ids": [message]})
        return communication_of(hapi, message)

    c = wait_until(retried, timeout=30, what="the message written after the retry")
    assert_ozo_communication(hapi, c)
    thread = resource(hapi, c["partOf"][0]["reference"])
    assert_ozo_thread(hapi, thread, network, requester=network.ref("Practitioner", "gp"))


def reply_to(user: MatrixUser, room: str, parent: str, text: str) -> str:
    return user.send(
        room,
        {
            "msgtype": "m.text",
            "body": text,
            "m.relates_to": {"m.in_reply_to": {"event_id": parent}},
        },
    )


def test_a_reply_names_its_parent_only_when_the_rooms_thread_holds_it(
    ozo_hapi: HapiDevServer, start_synapse: Callable[..., SynapseServer]
) -> None:
    """A reply to a message FHIR never got, or to another room's, is written without
    ``inResponseTo``: once a dead letter for good (HAPI could not resolve the reference),
    or a pointer into another thread."""
    hapi = ozo_hapi
    server = ozo_server(start_synapse, hapi)
    network = CareNetwork(uuid.uuid4().hex[:8])
    network.seed(FhirSeeder(hapi.base_url))
    ops = register_user(server, network.localpart("ops"), admin=True)
    service = service_session(register_user(server, network.localpart("root"), admin=True))
    space = create_bound_space(service, network.team)
    room, other_room = create_room_in_space(service, space), create_room_in_space(service, space)
    gp = joined(server, service, room, network.localpart("anna"))
    daughter = joined(server, service, room, network.localpart("carla"))
    service.invite(other_room, gp.user_id)
    gp.join(other_room)

    elsewhere = written(hapi, gp.send_text(other_room, "Lab results are in"))
    by_service = service.send_text(room, "Visiting hours changed")  # never recorded (OZO)
    first = written(hapi, gp.send_text(room, "Wound looks clean"))
    made_up = f"$never-sent-{network.tag}"
    replies = {
        "recorded": reply_to(daughter, room, first["identifier"][0]["value"], "Thank you"),
        "service": reply_to(daughter, room, by_service, "Noted"),
        "elsewhere": reply_to(daughter, room, elsewhere["identifier"][0]["value"], "Which lab?"),
        "made up": reply_to(daughter, room, made_up, "Sorry?"),
    }
    recorded = {what: written(hapi, event_id) for what, event_id in replies.items()}
    for c in recorded.values():
        assert_ozo_communication(hapi, c)
        assert c["partOf"] == first["partOf"] != elsewhere["partOf"]
    assert [p["reference"] for p in recorded["recorded"]["inResponseTo"]] == [
        f"Communication/{first['id']}"
    ]
    for unrelated in ("service", "elsewhere", "made up"):
        assert "inResponseTo" not in recorded[unrelated], unrelated
    assert [d for d in dead_letters(ops) if d["room_id"] == room] == []
    # Logged with the reply's own ids: the parent's is whatever the client sent.
    log = [
        line
        for line in server.log_path.read_text(errors="replace").splitlines()
        if "synapse_fhir_module" in line
    ]
    assert [line for line in log if replies["made up"] in line and "inResponseTo" in line]
    assert not any(made_up in line for line in log)


def test_a_request_another_writer_made_under_the_rooms_id_never_becomes_its_thread(
    ozo_hapi: HapiDevServer, start_synapse: Callable[..., SynapseServer]
) -> None:
    """Anyone who writes FHIR can create a CommunicationRequest under a room's id before the
    module opens the room's thread — even with the module's origin tag. Naming another team
    and patient, it is never adopted: the room's messages wait as dead letters."""
    hapi = ozo_hapi
    server = ozo_server(start_synapse, hapi)
    network = CareNetwork(uuid.uuid4().hex[:8])
    seeder = FhirSeeder(hapi.base_url)
    network.seed(seeder)
    other_patient = network.person("Patient", "stranger", {})
    seeder.put(other_patient)
    ops = register_user(server, network.localpart("ops"), admin=True)
    service = service_session(register_user(server, network.localpart("root"), admin=True))
    room = create_room_in_space(service, create_bound_space(service, network.team))
    gp = joined(server, service, room, network.localpart("anna"))
    forged = thread_request(
        room,
        network.ref("CareTeam", "pharmacy"),
        network.ref("Patient", "stranger"),
        requester=network.ref("Practitioner", "outsider"),
        profile=OZO,
    )
    forged["id"] = f"forged-{network.tag}"
    seeder.put(forged)
    forged_ref = f"CommunicationRequest/{forged['id']}"

    message = gp.send_text(room, "Wound looks clean")
    (dead,) = wait_until(
        lambda: [d for d in dead_letters(ops) if d["event_id"] == message] or None,
        timeout=30,
        what="the message kept as a dead letter",
    )
    assert dead["reason"].startswith(f"no thread for the room: {forged_ref} carries the room's id")
    assert "not addressed to the room's care team" in dead["reason"]
    assert communication_of(hapi, message) is None
    in_forged = requests.get(
        f"{hapi.base_url}/Communication",
        params={"part-of": forged_ref},
        headers={"Cache-Control": "no-cache"},
        timeout=30,
    ).json()
    assert in_forged.get("entry", []) == []
    with pytest.raises(MatrixError):  # the room is not bound to it
        service.request("GET", f"/_matrix/client/v3/rooms/{room}/state/org.synapse_fhir.thread")

    # The request loses the room's id in FHIR; the operator retries: the module opens its own.
    seeder.put({key: value for key, value in forged.items() if key != "identifier"})
    assert ops.request("POST", RETRY_DEAD_LETTERS, {"event_ids": [message]}) == {"requeued": 1}
    c = written(hapi, message)
    assert_ozo_communication(hapi, c)
    assert c["partOf"][0]["reference"] != forged_ref
    thread = resource(hapi, c["partOf"][0]["reference"])
    assert_ozo_thread(hapi, thread, network, requester=network.ref("Practitioner", "gp"))


def test_a_redaction_withdraws_a_record_that_claims_ozo_without_meeting_it(
    ozo_hapi: HapiDevServer, start_synapse: Callable[..., SynapseServer]
) -> None:
    """Written so by another system or an older version, the record cannot meet the profile:
    the withdrawal still goes through (placeholder, entered-in-error), without the claim."""
    hapi = ozo_hapi
    server = ozo_server(start_synapse, hapi)
    network = CareNetwork(uuid.uuid4().hex[:8])
    seeder = FhirSeeder(hapi.base_url)
    network.seed(seeder)
    ops = register_user(server, network.localpart("ops"), admin=True)
    service = service_session(register_user(server, network.localpart("root"), admin=True))
    room = create_room_in_space(service, create_bound_space(service, network.team))
    gp = joined(server, service, room, network.localpart("anna"))
    mistake = gp.send_text(room, "Wrong patient, sorry")
    c = written(hapi, mistake)
    older = {key: value for key, value in c.items() if key != "meta"}
    older["meta"] = {"tag": c["meta"]["tag"], "profile": c["meta"]["profile"]}
    older["partOf"] = [{"reference": c["partOf"][0]["reference"]}]  # no `type`
    older["sender"] = {"reference": c["sender"]["reference"]}
    seeder.put(older)
    assert any("type" in error for error in validator_errors(hapi, older))

    gp.redact(room, mistake)
    withdrawn = written(
        hapi, mistake, lambda x: x["status"] == "entered-in-error", "the redaction applied"
    )
    assert withdrawn["payload"] == [{"contentString": WITHDRAWN_PLACEHOLDER}]
    assert "profile" not in withdrawn["meta"]
    assert "Wrong patient" not in str(withdrawn)
    assert validator_errors(hapi, withdrawn) == []
    Communication.model_validate(withdrawn)
    assert [d for d in dead_letters(ops) if d["room_id"] == room] == []
