"""A small OZO-style care network: a patient at home, the people who care for him, one team.

Names are invented; Matrix identities use the MSC2312 ``matrix:u/`` telecom form for
practitioners and the ``https://matrix.org/user-id`` identifier for the family, so both
forms DESIGN §3 names are present.
"""

from __future__ import annotations

from typing import Any

MATRIX_ID_SYSTEM = "https://matrix.org/user-id"


def matrix_telecom(localpart: str, server_name: str) -> dict[str, str]:
    return {"system": "url", "value": f"matrix:u/{localpart}:{server_name}"}


def matrix_identifier(localpart: str, server_name: str) -> dict[str, str]:
    return {"system": MATRIX_ID_SYSTEM, "value": f"@{localpart}:{server_name}"}


def care_network(server_name: str) -> list[dict[str, Any]]:
    """The resources, with client-assigned ids, in an order a transaction accepts."""
    return [
        {
            "resourceType": "Patient",
            "id": "demo-patient",
            "active": True,
            "name": [{"family": "Jansen", "given": ["Henk"]}],
            "identifier": [matrix_identifier("henk", server_name)],
        },
        {
            "resourceType": "Practitioner",
            "id": "demo-gp",
            "active": True,
            "name": [{"family": "de Vries", "given": ["Anna"], "prefix": ["dr."]}],
            "telecom": [matrix_telecom("anna", server_name)],
        },
        {
            "resourceType": "Practitioner",
            "id": "demo-nurse",
            "active": True,
            "name": [{"family": "Bakker", "given": ["Bram"]}],
            "telecom": [matrix_telecom("bram", server_name)],
        },
        {
            "resourceType": "RelatedPerson",
            "id": "demo-daughter",
            "active": True,
            "patient": {"reference": "Patient/demo-patient"},
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
            "identifier": [matrix_identifier("carla", server_name)],
        },
        {
            "resourceType": "CareTeam",
            "id": "demo-careteam",
            "status": "active",
            "name": "Home care team",
            "subject": {"reference": "Patient/demo-patient", "type": "Patient"},
            "participant": [
                {"member": {"reference": "Patient/demo-patient", "type": "Patient"}},
                {"member": {"reference": "Practitioner/demo-gp", "type": "Practitioner"}},
                {"member": {"reference": "Practitioner/demo-nurse", "type": "Practitioner"}},
                {"member": {"reference": "RelatedPerson/demo-daughter", "type": "RelatedPerson"}},
            ],
        },
    ]
