"""A care network like the OZO examples, written into HAPI by the tests, plus the Matrix
side: bound spaces and rooms created the way the module's service user creates them."""

from __future__ import annotations

from typing import Any

import attr

from devstack.fhir_seed import FhirSeeder
from devstack.synapse import SERVER_NAME

MATRIX_ID_SYSTEM = "https://matrix.org/user-id"
SNOMED = "http://snomed.info/sct"


def via_telecom(localpart: str) -> dict[str, Any]:
    return {"telecom": [{"system": "url", "value": f"matrix:u/{localpart}:{SERVER_NAME}"}]}


def via_identifier(localpart: str) -> dict[str, Any]:
    return {"identifier": [{"system": MATRIX_ID_SYSTEM, "value": f"@{localpart}:{SERVER_NAME}"}]}


@attr.s(auto_attribs=True, frozen=True)
class TwoServerNames:
    """Ids and Matrix ids of a network spread over two homeservers, A and B, each carrying
    ``tag`` so tests sharing a HAPI never collide."""

    tag: str
    a_name: str
    b_name: str

    def localpart(self, name: str) -> str:
        return f"{name}_{self.tag}"

    def on_a(self, name: str) -> str:
        return f"@{self.localpart(name)}:{self.a_name}"

    def on_b(self, name: str) -> str:
        return f"@{self.localpart(name)}:{self.b_name}"

    def ref(self, resource_type: str, name: str) -> str:
        return f"{resource_type}/{name}-{self.tag}"

    @property
    def team(self) -> str:
        return self.ref("CareTeam", "team")


@attr.s(auto_attribs=True)
class CareNetwork:
    """Ids and Matrix localparts carry ``tag`` so tests sharing a HAPI never collide."""

    tag: str

    def localpart(self, name: str) -> str:
        return f"{name}_{self.tag}"

    def user_id(self, name: str) -> str:
        return f"@{self.localpart(name)}:{SERVER_NAME}"

    def ref(self, resource_type: str, name: str) -> str:
        return f"{resource_type}/{name}-{self.tag}"

    @property
    def team(self) -> str:
        return self.ref("CareTeam", "team")

    def participant(self, ref: str, period: dict | None = None, role: str | None = None) -> dict:
        p: dict[str, Any] = {"member": {"reference": ref, "type": ref.split("/")[0]}}
        if period:
            p["period"] = period
        if role:
            p["role"] = [{"coding": [{"system": SNOMED, "code": role}]}]
        return p

    def person(self, resource_type: str, name: str, identity: dict, active: bool = True) -> dict:
        return {
            "resourceType": resource_type,
            "id": f"{name}-{self.tag}",
            "active": active,
            **identity,
        }

    def care_team(self, *participants: dict, status: str = "active") -> dict:
        return {
            "resourceType": "CareTeam",
            "id": f"team-{self.tag}",
            "status": status,
            "name": "Home care team",
            "subject": {"reference": self.ref("Patient", "patient"), "type": "Patient"},
            "participant": list(participants),
        }

    def standard_participants(self) -> list[dict]:
        return [
            self.participant(self.ref("Patient", "patient")),
            self.participant(self.ref("Practitioner", "gp"), role="62247001"),
            self.participant(self.ref("PractitionerRole", "nurse-role"), role="224535009"),
            self.participant(self.ref("RelatedPerson", "daughter")),
            self.participant(self.ref("Practitioner", "inactive")),
            self.participant(self.ref("Practitioner", "former"), {"end": "2020-12-31"}),
            self.participant(self.ref("Practitioner", "future"), {"start": "2099-01-01"}),
            self.participant(self.ref("CareTeam", "pharmacy")),
        ]

    def resources(self) -> list[dict[str, Any]]:
        """Everything, in an order one transaction accepts."""
        lp = self.localpart
        return [
            self.person("Patient", "patient", via_identifier(lp("henk"))),
            self.person("Practitioner", "gp", via_telecom(lp("anna"))),
            self.person("Practitioner", "nurse", via_identifier(lp("bram"))),
            {
                "resourceType": "PractitionerRole",
                "id": f"nurse-role-{self.tag}",
                "active": True,
                "practitioner": {"reference": self.ref("Practitioner", "nurse")},
            },
            self.person("RelatedPerson", "daughter", via_identifier(lp("carla")))
            | {"patient": {"reference": self.ref("Patient", "patient")}},
            self.person("Practitioner", "inactive", via_telecom(lp("ivo")), active=False),
            self.person("Practitioner", "former", via_telecom(lp("olga"))),
            self.person("Practitioner", "future", via_telecom(lp("fred"))),
            self.person("Practitioner", "pharmacist", via_telecom(lp("piet"))),
            self.person("Practitioner", "outsider", via_telecom(lp("mallory"))),
            self.person("Practitioner", "leaver", via_telecom(lp("lena"))),
            # The pharmacy team lists the home team back: a cycle the module must survive.
            {
                "resourceType": "CareTeam",
                "id": f"pharmacy-{self.tag}",
                "status": "active",
                "participant": [
                    self.participant(self.ref("Practitioner", "pharmacist")),
                    self.participant(self.team),
                ],
            },
            self.care_team(*self.standard_participants()),
        ]

    def seed(self, fhir: FhirSeeder) -> None:
        fhir.put_all(self.resources())
