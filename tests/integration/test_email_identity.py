"""Real care-record data (issue 12): an OZO-shaped network in which nobody carries a
Matrix id — people are found by their email — works end to end.

The network (written here, in the shape the OZO guide gives its data): a patient with no
email and no account; a daughter whose address FHIR spells with capitals; a son and his
wife sharing one family address; a GP and a district nurse whose addresses are OZO email
*identifiers*; a pharmacist whose record names her Matrix account the Nuts way; an
organisational team (no subject) nested in the patient's network, reaching the nurse a
second time through a versioned reference. The CareTeam has no name, its participants no
roles, its references no types.

Accounts get their verified addresses through Synapse's admin API, which runs Synapse's
own 3PID code (and so the module's 3PID callbacks).
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
from devstack.matrix_client import MatrixError, MatrixUser, register_user
from devstack.synapse import SynapseServer
from devstack.waiting import wait_until
from tests.integration.matrix_views import expired_error, invited_space, membership, open_invites
from tests.integration.quiet_stack import QuietStack, quiet_stack
from tests.integration.test_communication_recording import communication_of

OZO_EMAIL = "https://www.ozoverbindzorg.nl/namingsystem/email"
PURPOSE = "http://example.org/fhir/StructureDefinition/contactpoint-purpose"
FOLLOWS_WITHIN = 30.0


@pytest.fixture(scope="module")
def stack(run_dir: Path, quiet_hapi: HapiDevServer) -> Iterator[QuietStack]:
    with quiet_stack(
        run_dir / "email-identity",
        quiet_hapi,
        full_reconcile_interval="1h",
        identity={"email_identifier_systems": [OZO_EMAIL]},
    ) as stack:
        yield stack


class Network:
    """The OZO-shaped network of one test, its accounts, and its admin."""

    def __init__(self, stack: QuietStack) -> None:
        self.stack = stack
        self.tag = uuid.uuid4().hex[:8]
        self.admin = register_user(stack.synapse, f"admin_{self.tag}", admin=True)
        self.users = {
            name: register_user(stack.synapse, f"{name}_{self.tag}")
            for name in ("daughter", "son", "gp", "nurse", "pharmacist", "imposter")
        }

    def ref(self, resource_type: str, name: str) -> str:
        return f"{resource_type}/{name}-{self.tag}"

    def address(self, name: str) -> str:
        return f"{name}-{self.tag}@care.example"

    @property
    def team(self) -> str:
        return self.ref("CareTeam", "network")

    def give_email(self, name: str, address: str | None) -> None:
        """Make ``address`` the account's one verified email (None: no email)."""
        threepids = [] if address is None else [{"medium": "email", "address": address}]
        self.admin.request(
            "PUT",
            f"/_synapse/admin/v2/users/{quote(self.users[name].user_id)}",
            {"threepids": threepids},
        )

    def seed(self) -> None:
        tag = self.tag
        family = f"family-{tag}@care.example"

        def person(resource_type: str, key: str, **fields: Any) -> dict[str, Any]:
            return {"resourceType": resource_type, "id": f"{key}-{tag}", **fields}

        def email_identifier(name: str) -> list[dict[str, str]]:
            return [{"system": OZO_EMAIL, "value": self.address(name)}]

        resources = [
            person("Patient", "patient", name=[{"family": "de Vries"}]),
            person(
                "RelatedPerson",
                "daughter",
                patient={"reference": self.ref("Patient", "patient")},
                telecom=[{"system": "email", "value": self.address("daughter").upper()}],
            ),
            person(
                "RelatedPerson",
                "son",
                patient={"reference": self.ref("Patient", "patient")},
                telecom=[{"system": "email", "value": family}],
            ),
            person(
                "RelatedPerson",
                "son-wife",
                patient={"reference": self.ref("Patient", "patient")},
                telecom=[{"system": "email", "value": family}],
            ),
            person("Practitioner", "gp", identifier=email_identifier("gp")),
            person("Practitioner", "nurse", active=True, identifier=email_identifier("nurse")),
            person(
                "PractitionerRole",
                "nurse-role",
                practitioner={"reference": self.ref("Practitioner", "nurse")},
            ),
            person(
                "Practitioner",
                "pharmacist",
                identifier=email_identifier("pharmacist"),
                telecom=[
                    {
                        "system": "other",
                        "value": self.users["pharmacist"].user_id,
                        "extension": [{"url": PURPOSE, "valueCode": "matrix-messaging"}],
                    }
                ],
            ),
            {
                # An organisational team: no subject, no name.
                "resourceType": "CareTeam",
                "id": f"homecare-{tag}",
                "status": "active",
                "participant": [
                    {"member": {"reference": f"{self.ref('Practitioner', 'nurse')}/_history/1"}},
                ],
            },
            {
                "resourceType": "CareTeam",
                "id": f"network-{tag}",
                "status": "active",
                "subject": {"reference": self.ref("Patient", "patient")},
                "participant": [
                    {"member": {"reference": self.ref(kind, name)}}
                    for kind, name in (
                        ("Patient", "patient"),
                        ("RelatedPerson", "daughter"),
                        ("RelatedPerson", "son"),
                        ("RelatedPerson", "son-wife"),
                        ("Practitioner", "gp"),
                        ("PractitionerRole", "nurse-role"),
                        ("Practitioner", "pharmacist"),
                        ("CareTeam", "homecare"),
                    )
                ],
            },
        ]
        self.stack.fhir.put_all(resources)
        # Accounts' addresses: the son's is the family's (two persons carry it), the
        # imposter holds the pharmacist's (whose record names another account).
        self.give_email("daughter", self.address("daughter"))
        self.give_email("son", family)
        self.give_email("nurse", self.address("nurse"))
        self.give_email("imposter", self.address("pharmacist"))
        self.stack.notify(self.team)

    def joined_space(self, name: str) -> str:
        user = self.users[name]
        space = wait_until(
            lambda: invited_space(user, self.team),
            timeout=FOLLOWS_WITHIN,
            what=f"{name} invited to the network's space",
        )
        user.join(space)
        return space


@pytest.fixture
def network(stack: QuietStack) -> Network:
    network = Network(stack)
    network.seed()
    return network


def health(synapse: SynapseServer) -> dict[str, Any]:
    return requests.get(synapse.url("/_synapse/client/fhir/health"), timeout=10).json()


def power_levels(user: MatrixUser, room_id: str) -> dict[str, int]:
    content = user.request(
        "GET", f"/_matrix/client/v3/rooms/{quote(room_id)}/state/m.room.power_levels/"
    )
    return dict(content["users"])


def test_people_found_by_email_are_invited_once_with_their_type_s_power(
    network: Network,
) -> None:
    daughter_space = network.joined_space("daughter")  # FHIR spells her address in capitals
    nurse_space = network.joined_space("nurse")  # an OZO identifier, reached twice
    pharmacist_space = network.joined_space("pharmacist")  # the Nuts form
    assert daughter_space == nurse_space == pharmacist_space
    space = daughter_space

    # A team with no name gets the configured default; no role gives the type's level.
    name = network.users["daughter"].request(
        "GET", f"/_matrix/client/v3/rooms/{quote(space)}/state/m.room.name/"
    )
    assert name["name"] == "Care team"
    levels = power_levels(network.users["daughter"], space)
    assert levels[network.users["nurse"].user_id] == 50
    assert levels[network.users["pharmacist"].user_id] == 50
    assert network.users["daughter"].user_id not in levels  # users_default 0

    # Nobody else: not the son (his address is also his wife's), not the account that
    # holds the pharmacist's address (her record names her account), not the GP (no
    # address on her account yet).
    members = network.users["daughter"].request(
        "GET", f"/_matrix/client/v3/rooms/{quote(space)}/joined_members"
    )["joined"]
    assert set(members) == {
        network.users[n].user_id for n in ("daughter", "nurse", "pharmacist")
    } | {f"@fhir:{network.stack.synapse.server_name}"}
    for name in ("son", "imposter", "gp"):
        assert membership(network.users["daughter"], space, network.users[name].user_id) is None
        assert invited_space(network.users[name], network.team) is None
        with pytest.raises(MatrixError) as refused:
            network.users[name].join(space)
        assert (refused.value.status, refused.value.reason) == (403, "not_in_care_team")

    # The shared address is counted, and its two persons named in the log (no address).
    assert health(network.stack.synapse)["identity"]["ambiguous_emails"] >= 1
    log = network.stack.synapse.log_path.read_text()
    assert network.ref("RelatedPerson", "son") in log
    assert network.ref("RelatedPerson", "son-wife") in log
    assert f"family-{network.tag}@care.example" not in log


def test_an_account_that_gains_or_loses_the_address_joins_or_leaves_within_seconds(
    network: Network,
) -> None:
    space = network.joined_space("daughter")
    gp = network.users["gp"]
    assert invited_space(gp, network.team) is None

    network.give_email("gp", network.address("gp"))
    assert network.joined_space("gp") == space
    assert power_levels(network.users["daughter"], space)[gp.user_id] == 50

    network.give_email("gp", None)
    wait_until(
        lambda: membership(network.users["daughter"], space, gp.user_id) == "leave",
        timeout=FOLLOWS_WITHIN,
        what="the GP removed from the space once her account lost the address",
    )
    with pytest.raises(MatrixError) as refused:
        gp.join(space)
    assert (refused.value.status, refused.value.reason) == (403, "not_in_care_team")


def test_messages_are_recorded_as_the_person_the_address_makes_the_account(
    network: Network,
) -> None:
    thread = network.ref("CommunicationRequest", "thread")
    network.stack.fhir.put(
        {
            "resourceType": "CommunicationRequest",
            "id": thread.split("/")[1],
            "status": "active",
            "subject": {"reference": network.ref("Patient", "patient")},
            "recipient": [{"reference": network.team}],
        }
    )
    network.stack.notify(thread)
    daughter = network.users["daughter"]
    room = wait_until(
        lambda: next((r for r, ref in open_invites(daughter).items() if ref == thread), None),
        timeout=FOLLOWS_WITHIN,
        what="the daughter invited to the thread's room",
    )
    daughter.join(room)
    event_id = daughter.send_text(room, "Ik kom morgen om tien uur")
    communication = wait_until(
        lambda: communication_of(network.stack.hapi, event_id),
        timeout=FOLLOWS_WITHIN,
        what="the daughter's message recorded",
    )
    assert communication["sender"]["reference"] == network.ref("RelatedPerson", "daughter")


def test_a_person_found_by_email_made_inactive_loses_the_account_and_the_room(
    network: Network,
) -> None:
    space = network.joined_space("nurse")
    network.joined_space("pharmacist")  # (a member who watches)
    nurse = network.users["nurse"]
    assert nurse.whoami() == nurse.user_id
    network.stack.fhir.patch_active(network.ref("Practitioner", "nurse"), False)
    network.stack.notify(network.ref("Practitioner", "nurse"))

    wait_until(
        lambda: membership(network.users["pharmacist"], space, nurse.user_id) == "leave",
        timeout=FOLLOWS_WITHIN,
        what="the inactive nurse removed from the space",
    )
    expired = wait_until(
        lambda: expired_error(nurse),
        timeout=FOLLOWS_WITHIN,
        what="the inactive nurse's account answered as expired",
    )
    assert expired.status == 403
