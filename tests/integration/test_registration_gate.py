"""registration.require_fhir_identity: an account only for the one active person in the
care record whom the registration identifies — by a username their record names and
their own verified email, or by the email alone — and no squatting on anybody else's.

Registrations go through Synapse's real email verification: it mails a link to a
throwaway SMTP server here, and the test follows it as the address's owner would.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from devstack.email_registration import register_with_email, username_available
from devstack.fhir_seed import FhirSeeder
from devstack.hapi import HapiDevServer
from devstack.matrix_client import MatrixError, MatrixUser, register_publicly, register_user
from devstack.ports import free_port
from devstack.rooms import create_bound_space, create_room_in_space, service_session
from devstack.smtp import SmtpServer
from devstack.synapse import SynapseServer, module_config
from devstack.waiting import wait_until
from synapse_fhir_module.identity import account_store
from tests.conftest import SERVER_LOGS
from tests.integration.care_network import CareNetwork, via_identifier, via_telecom
from tests.integration.matrix_views import expired_error

CACHE_TTL = "2s"  # account validity re-reads FHIR persons this often

OPEN_REGISTRATION = {
    "enable_registration": True,
    "enable_registration_without_verification": True,
}


def email_registration(smtp: SmtpServer) -> dict[str, Any]:
    """Synapse config: registration open to anyone who proves an email address."""
    return {
        "enable_registration": True,
        "registrations_require_3pid": ["email"],
        "email": smtp.synapse_config(),
    }


class People(CareNetwork):
    """The persons of these tests; ids, usernames and addresses carry the tag."""

    def email(self, name: str) -> str:
        return f"{name}.{self.tag}@example.org"

    def with_email(self, name: str) -> dict[str, Any]:
        return {"telecom": [{"system": "email", "value": self.email(name)}]}

    def named_with_email(self, name: str, *, identifier: bool = False) -> dict[str, Any]:
        """Names ``<name>_<tag>`` as its Matrix account and carries ``<name>.<tag>@...``."""
        naming = via_identifier if identifier else via_telecom
        identity = naming(self.localpart(name))
        identity.setdefault("telecom", []).extend(self.with_email(name)["telecom"])
        return identity

    def resources(self) -> list[dict[str, Any]]:
        person = self.person
        shared = {"telecom": [{"system": "email", "value": self.email("shared")}]}
        sam = via_telecom(self.localpart("sam"))
        sam["telecom"] += shared["telecom"]
        return [
            person("Practitioner", "anna", self.named_with_email("anna")),
            person("RelatedPerson", "carla", self.named_with_email("carla", identifier=True))
            | {"patient": {"reference": self.ref("Patient", "henk")}},
            person("Practitioner", "dora", self.named_with_email("dora")),
            person("Practitioner", "bram", self.named_with_email("bram")),
            # Nobody names henk's account: his email alone identifies him.
            person("Patient", "henk", self.with_email("henk")),
            person("Patient", "quinn", self.with_email("quinn")),
            person("Practitioner", "ivo", self.named_with_email("ivo"), active=False),
            # Two records name the same account.
            person("Practitioner", "twin-a", self.named_with_email("twin")),
            person("Patient", "twin-b", via_identifier(self.localpart("twin"))),
            # One address, two persons: Sam, and an old record of someone else.
            person("Practitioner", "sam", sam),
            person("RelatedPerson", "old", shared, active=False)
            | {"patient": {"reference": self.ref("Patient", "henk")}},
        ]


@pytest.fixture(scope="module")
def people(hapi: HapiDevServer) -> People:
    people = People(uuid.uuid4().hex[:8])
    FhirSeeder(hapi.base_url).put_all(people.resources())
    return people


@pytest.fixture(scope="module")
def gated(
    hapi: HapiDevServer, run_dir: Path, smtp: SmtpServer, people: People
) -> Iterator[SynapseServer]:
    config = module_config(
        hapi.base_url,
        registration={"require_fhir_identity": True},
        enforcement={
            "cache_ttl": CACHE_TTL,
            "exempt_users": [people.user_id("audit"), people.user_id("root")],
        },
    )
    server = SynapseServer(
        run_dir / "synapse-registration", config, extra_config=email_registration(smtp)
    )
    SERVER_LOGS.extend([server.log_path, server.process.log_path])
    server.start()
    try:
        yield server
    finally:
        server.stop()


def recorded_account(server: SynapseServer, user_id: str) -> account_store.RecordedAccount | None:
    """The module's record of ``user_id``'s person, read from the server's SQLite file."""
    connection = sqlite3.connect(f"file:{server.workdir / 'homeserver.db'}?mode=ro", uri=True)
    try:
        return account_store.recorded_account(connection.cursor(), user_id)
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return None  # nothing recorded on this server yet
        raise
    finally:
        connection.close()


def assert_registered(
    server: SynapseServer, response: requests.Response, localpart: str
) -> MatrixUser:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["user_id"] == server.user_id(localpart)
    return MatrixUser(server, body["user_id"], body["access_token"])


def assert_refused(
    server: SynapseServer,
    response: requests.Response,
    localpart: str,
    reason: str = "no_fhir_identity",
) -> None:
    assert response.status_code == 403, response.text
    body = response.json()
    assert body["errcode"] == "M_FORBIDDEN"
    assert body["org.synapse_fhir.reason"] == reason
    assert "care record" in body["error"]
    # Nobody got the username, and no person was recorded for it.
    assert username_available(server, localpart)
    assert recorded_account(server, server.user_id(localpart)) is None


def test_a_person_registers_the_username_their_record_names_with_their_own_email(
    gated: SynapseServer, smtp: SmtpServer, people: People
) -> None:
    # Typed with capitals: addresses are compared case-insensitively.
    response = register_with_email(
        gated, smtp, people.localpart("anna"), people.email("anna").capitalize()
    )
    anna = assert_registered(gated, response, people.localpart("anna"))
    record = recorded_account(gated, anna.user_id)
    assert record is not None
    assert (record.person, record.established_by) == (
        people.ref("Practitioner", "anna"),
        "username_and_email",
    )
    assert anna.whoami() == anna.user_id

    # RelatedPerson, naming the account in the identifier form.
    response = register_with_email(gated, smtp, people.localpart("carla"), people.email("carla"))
    carla = assert_registered(gated, response, people.localpart("carla"))
    record = recorded_account(gated, carla.user_id)
    assert record is not None and record.person == people.ref("RelatedPerson", "carla")


def test_an_email_alone_makes_the_account_of_the_one_person_who_carries_it(
    hapi: HapiDevServer, gated: SynapseServer, smtp: SmtpServer, people: People
) -> None:
    """Nobody names the username; Henk's verified address makes it Henk's account, and
    the module treats it as his from then on: inactive Henk, expired account."""
    localpart = people.localpart("henk")
    henk = assert_registered(
        gated, register_with_email(gated, smtp, localpart, people.email("henk")), localpart
    )
    record = recorded_account(gated, henk.user_id)
    assert record is not None
    assert (record.person, record.established_by) == (people.ref("Patient", "henk"), "email")
    assert henk.whoami() == henk.user_id

    FhirSeeder(hapi.base_url).patch_active(people.ref("Patient", "henk"), False)
    expired = wait_until(
        lambda: expired_error(henk),
        timeout=30,
        what="the account registered by Henk's email expired once Henk is inactive",
    )
    assert expired.status == 403

    FhirSeeder(hapi.base_url).patch_active(people.ref("Patient", "henk"), True)
    wait_until(henk.whoami, timeout=30, what="Henk's account usable again once he is active")


def test_a_username_a_person_names_needs_that_person_s_email(
    gated: SynapseServer, smtp: SmtpServer, people: People
) -> None:
    """Dora's username, proven with someone else's address, or with an address nobody in
    the care record carries: not Dora's account, and nobody else's."""
    dora = people.localpart("dora")
    for address in (people.email("bram"), people.email("nobody")):
        assert_refused(gated, register_with_email(gated, smtp, dora, address), dora)


def test_an_email_whose_person_names_an_account_opens_only_that_account(
    gated: SynapseServer, smtp: SmtpServer, people: People
) -> None:
    """Dora's record names her account: her address cannot open a second one."""
    other = people.localpart("dora-again")
    assert_refused(gated, register_with_email(gated, smtp, other, people.email("dora")), other)


def test_an_email_several_persons_carry_identifies_none_of_them(
    gated: SynapseServer, smtp: SmtpServer, people: People
) -> None:
    """Sam's address is also on an old, inactive record: neither Sam's own username nor a
    free one can be registered with it."""
    for localpart in (people.localpart("sam"), people.localpart("newcomer")):
        response = register_with_email(gated, smtp, localpart, people.email("shared"))
        assert_refused(gated, response, localpart)


def test_inactive_or_doubly_named_persons_cannot_register(
    gated: SynapseServer, smtp: SmtpServer, people: People
) -> None:
    for name in ("ivo", "twin"):  # inactive Ivo; an account two records name
        localpart = people.localpart(name)
        response = register_with_email(gated, smtp, localpart, people.email(name))
        assert_refused(gated, response, localpart)


def test_exempt_names_are_registered_by_admins_only_and_without_a_person(
    gated: SynapseServer, smtp: SmtpServer, people: People
) -> None:
    """An exempt account (an audit bot; the service user alike) is nobody's person: a client
    asking for its name first would hold it, so only the admin APIs may make it."""
    localpart = people.localpart("audit")
    response = register_with_email(gated, smtp, localpart, people.email("audit"))
    assert_refused(gated, response, localpart)
    audit = register_user(gated, localpart)  # the shared-secret admin API
    assert audit.user_id == gated.user_id(localpart)
    assert recorded_account(gated, audit.user_id) is None


def test_a_name_registered_first_is_nobody_s_once_another_record_names_it(
    hapi: HapiDevServer, gated: SynapseServer, smtp: SmtpServer, people: People
) -> None:
    """Quinn registers a free username with her own address: it is hers. Later Dr Smith's
    record names that very account (he would have registered it himself): the account is
    neither's, and stays out of his care team's rooms."""
    localpart = people.localpart("drsmith")
    taken = assert_registered(
        gated, register_with_email(gated, smtp, localpart, people.email("quinn")), localpart
    )
    record = recorded_account(gated, taken.user_id)
    assert record is not None and record.person == people.ref("Patient", "quinn")

    seeder = FhirSeeder(hapi.base_url)
    team_ref = people.ref("CareTeam", "smith-team")
    seeder.put_all(
        [
            people.person("Practitioner", "drsmith", via_telecom(localpart)),
            {
                "resourceType": "CareTeam",
                "id": team_ref.split("/")[1],
                "status": "active",
                "participant": [
                    {"member": {"reference": people.ref("Practitioner", "drsmith")}},
                    {"member": {"reference": people.ref("Practitioner", "anna")}},
                ],
            },
        ]
    )
    root = register_user(gated, people.localpart("root"), admin=True)  # exempt
    service = service_session(root)
    room = create_room_in_space(service, create_bound_space(service, team_ref))
    with pytest.raises(MatrixError) as refused:
        service.invite(room, taken.user_id)
    assert (refused.value.status, refused.value.reason) == (403, "not_in_care_team")
    # The control: the team's other member is let in.
    service.invite(room, gated.user_id(people.localpart("anna")))


def test_the_admin_api_registers_only_exempt_users_too(
    gated: SynapseServer, people: People
) -> None:
    """Synapse runs the registration check for the shared-secret admin API as well, with
    no email: a person's username is refused there like anywhere without one."""
    bram = people.localpart("bram")
    with pytest.raises(MatrixError) as refused:
        register_user(gated, bram)
    assert (refused.value.status, refused.value.errcode, refused.value.reason) == (
        403,
        "M_FORBIDDEN",
        "no_fhir_identity",
    )
    assert username_available(gated, bram)


def test_the_person_is_recorded_with_account_validity_off_too(
    hapi: HapiDevServer,
    start_synapse: Callable[..., SynapseServer],
    smtp: SmtpServer,
    people: People,
) -> None:
    server = start_synapse(
        module_config(
            hapi.base_url,
            registration={"require_fhir_identity": True},
            account_validity={"enabled": False},
        ),
        extra_config=email_registration(smtp),
    )
    localpart = people.localpart("carla")
    carla = assert_registered(
        server, register_with_email(server, smtp, localpart, people.email("carla")), localpart
    )
    record = recorded_account(server, carla.user_id)
    assert record is not None and record.person == people.ref("RelatedPerson", "carla")


def test_registration_is_refused_while_fhir_cannot_be_asked(
    start_synapse: Callable[..., SynapseServer], smtp: SmtpServer, people: People
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}/fhir"  # nothing listens there
    server = start_synapse(
        module_config(nowhere, registration={"require_fhir_identity": True}),
        extra_config=email_registration(smtp),
    )
    localpart = people.localpart("bram")
    response = register_with_email(server, smtp, localpart, people.email("bram"))
    assert_refused(server, response, localpart, reason="directory_unavailable")


def test_registration_needs_an_active_fhir_person_when_required(
    hapi: HapiDevServer, start_synapse: Callable[..., SynapseServer]
) -> None:
    """Open registration without email verification: even a username an active person
    names is refused — nothing shows the registrant is that person."""
    network = CareNetwork(uuid.uuid4().hex[:8])
    network.seed(FhirSeeder(hapi.base_url))
    server = start_synapse(
        module_config(hapi.base_url, registration={"require_fhir_identity": True}),
        extra_config=OPEN_REGISTRATION,
    )
    # Named by an active Practitioner (telecom form) / RelatedPerson (identifier form);
    # nobody in FHIR; only an inactive practitioner.
    for name in ("anna", "carla", "eve", "ivo"):
        localpart = network.localpart(name)
        assert_refused(server, register_publicly(server, localpart), localpart)


def test_anyone_may_register_when_not_required(
    hapi: HapiDevServer, start_synapse: Callable[..., SynapseServer]
) -> None:
    server = start_synapse(module_config(hapi.base_url), extra_config=OPEN_REGISTRATION)
    response = register_publicly(server, f"eve_{uuid.uuid4().hex[:8]}")
    assert response.status_code == 200, response.text
