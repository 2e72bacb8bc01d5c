"""A small OZO-style care network: a patient at home, the people who care for him, one team,
one outsider; a thread for the team, and a message from another system.

Names are invented; Matrix identities use the MSC2312 ``matrix:u/`` telecom form for
practitioners and the ``https://matrix.org/user-id`` identifier for the family, so both
forms design.md: mapping names are present.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

MATRIX_ID_SYSTEM = "https://matrix.org/user-id"
SNOMED = "http://snomed.info/sct"
TEAM = "CareTeam/demo-careteam"
THREAD = "CommunicationRequest/demo-thread"
PATIENT = "Patient/demo-patient"


@dataclass(frozen=True)
class Person:
    """Someone in the demo: how the output names them, their account, their FHIR resource."""

    role: str
    localpart: str
    reference: str


GP = Person("GP", "anna", "Practitioner/demo-gp")
NURSE = Person("district nurse", "bram", "Practitioner/demo-nurse")
DAUGHTER = Person("daughter", "carla", "RelatedPerson/demo-daughter")
PATIENT_PERSON = Person("patient", "henk", PATIENT)
OUTSIDER = Person("outsider", "mallory", "Practitioner/demo-outsider")
TEAM_MEMBERS = (GP, NURSE, DAUGHTER, PATIENT_PERSON)
EVERYONE = (*TEAM_MEMBERS, OUTSIDER)


def matrix_telecom(localpart: str, server_name: str) -> dict[str, str]:
    return {"system": "url", "value": f"matrix:u/{localpart}:{server_name}"}


def matrix_identifier(localpart: str, server_name: str) -> dict[str, str]:
    return {"system": MATRIX_ID_SYSTEM, "value": f"@{localpart}:{server_name}"}


def _id(reference: str) -> str:
    return reference.split("/", 1)[1]


def _ref(reference: str) -> dict[str, str]:
    return {"reference": reference, "type": reference.split("/", 1)[0]}


def _practitioner(person: Person, given: str, family: str, server_name: str) -> dict[str, Any]:
    return {
        "resourceType": "Practitioner",
        "id": _id(person.reference),
        "active": True,
        "name": [{"family": family, "given": [given]}],
        "telecom": [matrix_telecom(person.localpart, server_name)],
    }


def _participant(reference: str, role_code: str | None = None) -> dict[str, Any]:
    participant: dict[str, Any] = {"member": _ref(reference)}
    if role_code:
        participant["role"] = [{"coding": [{"system": SNOMED, "code": role_code}]}]
    return participant


def care_network(server_name: str) -> list[dict[str, Any]]:
    """The resources, with client-assigned ids, in an order a transaction accepts."""
    return [
        {
            "resourceType": "Patient",
            "id": _id(PATIENT),
            "active": True,
            "name": [{"family": "Jansen", "given": ["Henk"]}],
            "identifier": [matrix_identifier(PATIENT_PERSON.localpart, server_name)],
        },
        _practitioner(GP, "Anna", "de Vries", server_name),
        _practitioner(NURSE, "Bram", "Bakker", server_name),
        # The district nurse is in the team through a role at the home-care organisation.
        {
            "resourceType": "PractitionerRole",
            "id": "demo-nurse-role",
            "active": True,
            "practitioner": {"reference": NURSE.reference},
            "code": [{"coding": [{"system": SNOMED, "code": "224535009"}]}],
        },
        {
            "resourceType": "RelatedPerson",
            "id": _id(DAUGHTER.reference),
            "active": True,
            "patient": {"reference": PATIENT},
            "relationship": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode",
                            "code": "DAU",
                        }
                    ]
                }
            ],
            "name": [{"family": "Jansen", "given": ["Carla"]}],
            "identifier": [matrix_identifier(DAUGHTER.localpart, server_name)],
        },
        # Known to FHIR, with a Matrix account, but in nobody's care team here.
        _practitioner(OUTSIDER, "Mallory", "Smit", server_name),
        {
            "resourceType": "CareTeam",
            "id": _id(TEAM),
            "status": "active",
            "name": "Home care team",
            "subject": _ref(PATIENT),
            "participant": [
                _participant(PATIENT),
                _participant(GP.reference, "62247001"),  # general practitioner
                _participant("PractitionerRole/demo-nurse-role", "224535009"),  # district nurse
                _participant(DAUGHTER.reference),
            ],
        },
    ]


def thread_request(text: str) -> dict[str, Any]:
    """The GP opens a thread for the whole team (a CommunicationRequest to the CareTeam)."""
    return {
        "resourceType": "CommunicationRequest",
        "id": _id(THREAD),
        "status": "active",
        "category": [{"text": "Blood pressure"}],  # the room's name: never patient data
        "subject": _ref(PATIENT),
        "requester": _ref(GP.reference),
        "recipient": [_ref(TEAM)],
        "authoredOn": _now(),
        "payload": [{"contentString": text}],
    }


def outside_communication(resource_id: str, sender: Person, text: str) -> dict[str, Any]:
    """A Communication in the thread written by another system (no origin mark)."""
    return {
        "resourceType": "Communication",
        "id": resource_id,
        "status": "completed",
        "partOf": [_ref(THREAD)],
        "subject": _ref(PATIENT),
        "recipient": [_ref(TEAM)],
        "sender": _ref(sender.reference),
        "sent": _now(),
        "payload": [{"contentString": text}],
    }


def _now() -> str:
    """Now as a FHIR instant in UTC with milliseconds (as the module writes ``sent``)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
