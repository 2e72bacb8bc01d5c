"""Onboarding without an identity server (issue 12): a care-team member who has no
account gets one mail through Synapse's own mailer saying which server to join and where
— nothing about the patient, the team or their care — at most once per interval, also
across a restart; once they register with that address verified, they are invited to
their team's space within seconds.

A real SMTP server on loopback receives what Synapse sends; registration goes through
Synapse's real email verification.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack.email_registration import register_with_email
from devstack.hapi import HapiDevServer
from devstack.matrix_client import MatrixUser, register_user
from devstack.smtp import SmtpServer, plain_text
from devstack.waiting import wait_until
from tests.integration.matrix_views import invited_space
from tests.integration.quiet_stack import QuietStack, quiet_stack

OZO_EMAIL = "https://www.ozoverbindzorg.nl/namingsystem/email"
JOIN_URL = "https://chat.example.org/#/register"
FOLLOWS_WITHIN = 30.0
MAILED_WITHIN = 60.0
PATIENT_FAMILY_NAME = "Zwanenburg"
TEAM_NAME = "Thuiszorg mevrouw Zwanenburg"
# Words an invitation must never carry (English and Dutch): it leaves the hospital.
CLINICAL_WORDS = re.compile(
    r"patient|patiënt|care|zorg|clinic|klini|diagnos|medic|health|gezond|nurse|verpleeg|"
    r"doctor|arts|huisarts|pharmac|apothe|wound|wond|treatment|behandel",
    re.IGNORECASE,
)


@pytest.fixture(scope="module")
def stack(run_dir: Path, quiet_hapi: HapiDevServer, smtp: SmtpServer) -> Iterator[QuietStack]:
    with quiet_stack(
        run_dir / "email-invitations",
        quiet_hapi,
        full_reconcile_interval="1h",
        identity={
            "email_identifier_systems": [OZO_EMAIL],
            "invite_by_email": True,
            "join_url": JOIN_URL,
            "invite_interval": "7d",
        },
        extra_config={
            "enable_registration": True,
            "registrations_require_3pid": ["email"],
            # (The sender's display name is the operator's: no clinical word either.)
            "email": smtp.synapse_config(notif_from="Messaging <noreply@example.org>"),
        },
    ) as stack:
        yield stack


class Network:
    def __init__(self, stack: QuietStack) -> None:
        self.stack = stack
        self.tag = uuid.uuid4().hex[:8]
        self.gp = register_user(stack.synapse, f"gp_{self.tag}")

    def ref(self, resource_type: str, name: str) -> str:
        return f"{resource_type}/{name}-{self.tag}"

    def address(self, name: str) -> str:
        return f"{name}-{self.tag}@mail.example"

    @property
    def team(self) -> str:
        return self.ref("CareTeam", "team")

    def person(self, resource_type: str, key: str, **fields: Any) -> dict[str, Any]:
        return {"resourceType": resource_type, "id": f"{key}-{self.tag}", **fields}

    def email(self, name: str) -> list[dict[str, str]]:
        return [{"system": "email", "value": self.address(name)}]

    def care_team(self, *members: str) -> dict[str, Any]:
        return {
            "resourceType": "CareTeam",
            "id": f"team-{self.tag}",
            "status": "active",
            "name": TEAM_NAME,
            "subject": {"reference": self.ref("Patient", "patient")},
            "participant": [{"member": {"reference": member}} for member in members],
        }

    def seed(self) -> None:
        family = self.address("family")
        self.stack.fhir.put_all(
            [
                self.person(
                    "Patient",
                    "patient",
                    name=[{"family": PATIENT_FAMILY_NAME, "given": ["Johanna"]}],
                    telecom=self.email("patient"),
                ),
                self.person(
                    "Practitioner",
                    "gp",
                    telecom=[{"system": "url", "value": f"matrix:u/{self.gp.user_id[1:]}"}],
                ),
                self.person("RelatedPerson", "daughter", telecom=self.email("daughter")),
                self.person(
                    "Practitioner",
                    "nurse",
                    identifier=[{"system": OZO_EMAIL, "value": self.address("nurse")}],
                ),
                # Two persons on one address: a mail would lead to an account of nobody's.
                self.person("RelatedPerson", "son", telecom=[{"system": "email", "value": family}]),
                self.person(
                    "RelatedPerson", "son-wife", telecom=[{"system": "email", "value": family}]
                ),
                # Two addresses: which one would be theirs is a guess.
                self.person(
                    "RelatedPerson",
                    "neighbour",
                    telecom=[*self.email("neighbour"), *self.email("neighbour-work")],
                ),
                self.person("Practitioner", "retired", active=False, telecom=self.email("retired")),
                self.care_team(
                    *(
                        self.ref(kind, name)
                        for kind, name in (
                            ("Patient", "patient"),
                            ("Practitioner", "gp"),
                            ("RelatedPerson", "daughter"),
                            ("Practitioner", "nurse"),
                            ("RelatedPerson", "son"),
                            ("RelatedPerson", "son-wife"),
                            ("RelatedPerson", "neighbour"),
                            ("Practitioner", "retired"),
                        )
                    )
                ),
            ]
        )
        self.stack.notify(self.team)


def assert_no_clinical_content(message: Any, recipient: str) -> str:
    text = plain_text(message)
    html = message.get_body(preferencelist=("html",)).get_content()
    for part in (str(message["Subject"]), text, html, str(message["From"])):
        part = part.replace(recipient, "<recipient>")  # (the test's addresses name roles)
        assert PATIENT_FAMILY_NAME not in part and "Johanna" not in part
        assert TEAM_NAME not in part
        found = CLINICAL_WORDS.search(part)
        assert found is None, f"the invitation says {found.group(0)!r}"
    return text


def test_members_without_an_account_are_mailed_once_and_join_once_registered(
    stack: QuietStack, smtp: SmtpServer
) -> None:
    network = Network(stack)
    network.seed()
    wait_until(
        lambda: invited_space(network.gp, network.team),
        timeout=FOLLOWS_WITHIN,
        what="the GP (who has an account) invited to the team's space",
    )

    # One mail each to the daughter, the nurse (her OZO identifier) and the patient.
    for name in ("daughter", "nurse", "patient"):
        message = smtp.take_mail(network.address(name), timeout=MAILED_WITHIN)
        text = assert_no_clinical_content(message, network.address(name))
        assert stack.synapse.server_name in text
        assert JOIN_URL in text
        assert network.address(name) in text

    # After a restart the team is synced again (every team is, at start-up); a newcomer
    # added then is mailed — and in the same pass (persons in order of reference, the
    # newcomer last) nobody mailed already is mailed again.
    stack.synapse.stop()
    stack.synapse.start()
    newcomer = network.person("RelatedPerson", "zz-newcomer", telecom=network.email("newcomer"))
    team = network.care_team(
        *(m["member"]["reference"] for m in stack.fhir.read(network.team)["participant"]),
        network.ref("RelatedPerson", "zz-newcomer"),
    )
    stack.fhir.put_all([newcomer, team])
    stack.notify(network.team)
    smtp.take_mail(network.address("newcomer"), timeout=MAILED_WITHIN)
    mailed_again = smtp.waiting_for() & {
        network.address(name) for name in ("daughter", "nurse", "patient")
    }
    assert mailed_again == set()
    # Never mailed: a shared address, a person with two, an inactive person.
    never = {network.address(n) for n in ("family", "neighbour", "neighbour-work", "retired")}
    assert smtp.waiting_for() & never == set()

    # The daughter registers with the address the mail went to: she is invited within
    # seconds, with no FHIR write and no notification.
    localpart = f"daughter_{network.tag}"
    response = register_with_email(stack.synapse, smtp, localpart, network.address("daughter"))
    assert response.status_code == 200, response.text
    daughter = MatrixUser(
        stack.synapse, response.json()["user_id"], response.json()["access_token"]
    )
    wait_until(
        lambda: invited_space(daughter, network.team),
        timeout=FOLLOWS_WITHIN,
        what="the newly registered daughter invited to her team's space",
    )
