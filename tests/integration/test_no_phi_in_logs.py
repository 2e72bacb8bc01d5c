"""The homeserver log names no patient and quotes no message (issue 11): a whole care-network
scenario with real-looking names, a BSN, phone and email, clinical text — written to FHIR,
synced into Matrix, talked about, relayed, refused, failed — and the log read afterwards,
with the module logging at DEBUG.

The test notifies the Synapse after each FHIR write, as the shim would, so every path runs:
notification, sync, recording, relay, account validity, a denial, and a reply to an event
id a client made up out of the patient's BSN and name (recorded without the relation; the
id goes into a FHIR search, never into the log).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.hapi import HapiDevServer
from devstack.matrix_client import MatrixError, MatrixUser, register_user
from devstack.waiting import wait_until
from tests.integration.matrix_views import invited_space, open_invites
from tests.integration.quiet_stack import QuietStack, quiet_stack
from tests.integration.test_communication_recording import communication_of

FOLLOWS_WITHIN = 30.0
BSN_SYSTEM = "http://fhir.nl/fhir/NamingSystem/bsn"

PATIENT_GIVEN, PATIENT_FAMILY = "Johanna", "Vermeulen-Bakker"
BSN = "999998456"
PATIENT_PHONE = "+31 6 4827 1937"
PATIENT_EMAIL = "j.vermeulen-bakker@mailbox.example.nl"
PATIENT_STREET = "Kastanjelaan 17"
GP_NAME = ("Maarten", "Hoogeveen")
DAUGHTER_NAME = ("Sanne", "Vermeulen")
OUTSIDER_NAME = ("Kees", "Brouwersgracht")
MESSAGE = "Mevrouw Vermeulen-Bakker heeft sinds vannacht koorts, 38,9"
EDITED = "Correctie: temperatuur 39,2 om 07:00, paracetamol gegeven"
REDACTED_TEXT = "Verkeerde patient: BSN 999998456 hoort hier niet"
RELAYED = "Bloeddruk 152/94 gemeten, controle over een week"
REPLY_TEXT = "Antwoord over de wondgenezing van Johanna"


@pytest.fixture(scope="module")
def stack(run_dir: Path, quiet_hapi: HapiDevServer) -> Iterator[QuietStack]:
    with quiet_stack(run_dir / "phi-stack", quiet_hapi, full_reconcile_interval="1h") as stack:
        yield stack


def person(resource_type: str, rid: str, user: MatrixUser, name: tuple[str, str]) -> dict:
    return {
        "resourceType": resource_type,
        "id": rid,
        "active": True,
        "name": [{"given": [name[0]], "family": name[1], "text": " ".join(name)}],
        "telecom": [{"system": "url", "value": f"matrix:u/{user.user_id.removeprefix('@')}"}],
    }


def test_a_whole_scenario_leaves_no_patient_data_in_the_log(stack: QuietStack) -> None:
    tag = uuid.uuid4().hex[:8]
    # Account names that say nothing about the people (the log may name accounts).
    users = {
        role: register_user(stack.synapse, f"u{n}_{tag}")
        for n, role in enumerate(("patient", "gp", "daughter", "outsider", "ops"))
    }
    gp, daughter, outsider = users["gp"], users["daughter"], users["outsider"]
    team, thread = f"CareTeam/net-{tag}", f"CommunicationRequest/wound-{tag}"
    patient = person("Patient", f"p-{tag}", users["patient"], (PATIENT_GIVEN, PATIENT_FAMILY))
    patient["identifier"] = [{"system": BSN_SYSTEM, "value": BSN}]
    patient["telecom"] += [
        {"system": "phone", "value": PATIENT_PHONE},
        {"system": "email", "value": PATIENT_EMAIL},
    ]
    patient["address"] = [{"line": [PATIENT_STREET], "city": "Zwolle"}]
    patient["birthDate"] = "1941-03-09"
    fhir = stack.fhir
    fhir.put_all(
        [
            patient,
            person("Practitioner", f"gp-{tag}", gp, GP_NAME),
            person("RelatedPerson", f"d-{tag}", daughter, DAUGHTER_NAME)
            | {"patient": {"reference": f"Patient/p-{tag}"}},
            person("Practitioner", f"o-{tag}", outsider, OUTSIDER_NAME),
            {
                "resourceType": "CareTeam",
                "id": team.split("/")[1],
                "status": "active",
                "name": "Wijkteam",
                "subject": {"reference": f"Patient/p-{tag}"},
                "participant": [
                    {"member": {"reference": f"{ref}-{tag}"}}
                    for ref in ("Patient/p", "Practitioner/gp", "RelatedPerson/d")
                ],
            },
            {
                "resourceType": "CommunicationRequest",
                "id": thread.split("/")[1],
                "status": "active",
                "subject": {"reference": f"Patient/p-{tag}"},
                "recipient": [{"reference": team}],
                "category": [{"text": "Wondzorg"}],
                "payload": [
                    {"contentString": f"Wondcontrole bij {PATIENT_GIVEN} {PATIENT_FAMILY}"}
                ],
            },
        ]
    )
    for reference in (f"Patient/p-{tag}", team, thread):
        stack.notify(reference)
    for user in (gp, daughter):
        space = wait_until(
            lambda u=user: invited_space(u, team), timeout=FOLLOWS_WITHIN, what="invited"
        )
        user.join(space)
    room = wait_until(
        lambda: next((r for r, ref in open_invites(gp).items() if ref == thread), None),
        timeout=FOLLOWS_WITHIN,
        what="the thread's room",
    )
    gp.join(room)

    # Talk: a message, its edit, one redacted, a reply to a made-up target that carries the
    # BSN and the patient's name (the module looks it up in FHIR, finds nothing).
    said = gp.send_text(room, MESSAGE)
    gp.send(
        room,
        {
            "msgtype": "m.text",
            "body": f"* {EDITED}",
            "m.new_content": {"msgtype": "m.text", "body": EDITED},
            "m.relates_to": {"rel_type": "m.replace", "event_id": said},
        },
    )
    wrong = gp.send_text(room, REDACTED_TEXT)
    reply = gp.send(
        room,
        {
            "msgtype": "m.text",
            "body": REPLY_TEXT,
            "m.relates_to": {"m.in_reply_to": {"event_id": f"$bsn-{BSN}-{PATIENT_FAMILY}"}},
        },
    )
    wait_until(lambda: communication_of(stack.hapi, said), timeout=FOLLOWS_WITHIN, what="recorded")
    gp.redact(room, wrong)
    # Another system writes into the thread; it is relayed, attributed by name.
    fhir.put(
        {
            "resourceType": "Communication",
            "id": f"lab-{tag}",
            "status": "completed",
            "partOf": [{"reference": thread}],
            "sender": {"reference": f"Practitioner/gp-{tag}"},
            "payload": [{"contentString": RELAYED}],
        }
    )
    stack.notify(f"Communication/lab-{tag}")
    wait_until(
        lambda: any(
            RELAYED in str(e["content"].get("body"))
            for e in gp.request("GET", f"/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=50")[
                "chunk"
            ]
        ),
        timeout=FOLLOWS_WITHIN,
        what="the relay",
    )
    # An outsider refused; the patient made inactive (account validity, sync).
    with pytest.raises(MatrixError):
        gp.invite(room, outsider.user_id)
    fhir.put(patient | {"active": False})
    stack.notify(f"Patient/p-{tag}")
    answer = wait_until(
        lambda: communication_of(stack.hapi, reply),
        timeout=FOLLOWS_WITHIN,
        what="the reply recorded",
    )
    assert "inResponseTo" not in answer
    # A last recorded message: everything before it has passed through the module.
    last = gp.send_text(room, "Tot morgen")
    wait_until(lambda: communication_of(stack.hapi, last), timeout=FOLLOWS_WITHIN, what="recorded")

    log = stack.synapse.log_path.read_text(errors="replace")
    assert "synapse_fhir_module" in log and " - DEBUG - " in log  # the module's DEBUG lines
    private = {
        "patient's given name": PATIENT_GIVEN,
        "patient's family name": PATIENT_FAMILY,
        "BSN": BSN,
        "phone": PATIENT_PHONE,
        "email": PATIENT_EMAIL,
        "street": PATIENT_STREET,
        "birth date": "1941-03-09",
        "GP's name": GP_NAME[1],
        "daughter's name": DAUGHTER_NAME[0],
        "outsider's name": OUTSIDER_NAME[1],
        "message": MESSAGE,
        "edit": EDITED,
        "redacted message": REDACTED_TEXT,
        "relayed text": RELAYED,
        "reply": REPLY_TEXT,
        "thread's words": "Wondcontrole",
    }
    leaks = {what: text for what, text in private.items() if text in log}
    assert leaks == {}, f"patient data in the homeserver log: {sorted(leaks)}"
