"""Identity by email, decided by the real person directory and EmailIdentity over a FHIR
stand-in that matches search tokens exactly (as HAPI does) and Synapse's 3PIDs in a dict
(tests/integration/test_email_identity.py runs the real thing)."""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import pytest_twisted
from synapse.spam_checker_api import RegistrationBehaviour

from synapse_fhir_module.fhir.conventions import MATRIX_ID_SYSTEM
from synapse_fhir_module.fhir.person_directory import PersonDirectory
from synapse_fhir_module.identity.email_identity import EmailIdentity
from synapse_fhir_module.identity.verified_emails import VerifiedEmails

OZO_EMAIL = "https://www.ozoverbindzorg.nl/namingsystem/email"


class Fhir:
    """Token searches (identifier, telecom, _id) answered from resources, exactly."""

    def __init__(self, *resources: dict[str, Any]) -> None:
        self.resources = resources

    async def search_json(self, resource_type: str, params: Mapping[str, str]) -> list[dict]:
        found = []
        for resource in self.resources:
            if resource["resourceType"] != resource_type:
                continue
            tokens = {f"{i.get('system')}|{i.get('value')}" for i in resource.get("identifier", [])}
            tokens |= {f"{t.get('system')}|{t.get('value')}" for t in resource.get("telecom", [])}
            for name, value in params.items():
                wanted = set(value.split(","))
                if (name == "_id" and resource["id"] in wanted) or tokens & wanted:
                    found.append(resource)
                    break
        return found


class Emails:
    enabled = True

    def __init__(self, of_account: Mapping[str, set[str]]) -> None:
        self._of_account = of_account

    async def of_account(self, user_id: str) -> dict[str, int]:
        return dict.fromkeys(self._of_account.get(user_id, set()), 1)

    async def accounts_with(self, addresses: Collection[str]) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for user, held in self._of_account.items():
            for address in held & set(addresses):
                found.setdefault(address, set()).add(user)
        return found

    async def all_addresses(self) -> list[str]:
        return sorted(set().union(*self._of_account.values()))

    async def create_table(self) -> None:
        pass

    async def spellings(self, addresses: Collection[str]) -> dict[str, set[str]]:
        return {}

    async def remember_spellings(self, pairs: Collection[tuple[str, str]]) -> None:
        pass

    async def confirm_tie(self, user_id: str, address: str, person: str, validated: int) -> bool:
        return True


class NoRecords:
    async def persons_of(self, user_ids: Iterable[str]) -> dict[str, str]:
        return {}

    async def accounts_of_persons(self, persons: Iterable[str]) -> dict[str, list[str]]:
        return {}


def person(kind: str, key: str, *addresses: str, user_id: str | None = None) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": kind,
        "id": key,
        "identifier": [{"system": OZO_EMAIL, "value": a} for a in addresses],
    }
    if user_id:
        resource["identifier"].append({"system": MATRIX_ID_SYSTEM, "value": user_id})
    return resource


def identity(fhir: Fhir, accounts: Mapping[str, set[str]]) -> tuple[EmailIdentity, Any]:
    emails = Emails(accounts)
    persons = PersonDirectory(
        fhir,  # type: ignore[arg-type]
        emails=emails,
        email_identifier_systems=[OZO_EMAIL],
    )
    return EmailIdentity(None, persons, NoRecords(), emails), persons  # type: ignore[arg-type]


def by_reference(*resources: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f"{r['resourceType']}/{r['id']}": r for r in resources}


@pytest_twisted.ensureDeferred
async def test_an_account_is_the_one_person_carrying_its_address() -> None:
    gp = person("Practitioner", "gp", "gp@praktijk.example")
    ids, persons = identity(Fhir(gp), {"@gp:x": {"gp@praktijk.example"}})
    record = await persons.lookup("@gp:x")
    assert (record.person, record.active, record.by) == ("Practitioner/gp", True, "email")
    accounts_of, keys = await ids.resolver_for(by_reference(gp))
    assert set(accounts_of("Practitioner/gp", gp)) == {"@gp:x"}
    assert "email:gp@praktijk.example" in keys and "account:@gp:x" in keys


@pytest_twisted.ensureDeferred
async def test_an_explicit_matrix_id_wins_over_the_address() -> None:
    named = person("Practitioner", "gp", "gp@praktijk.example", user_id="@gp:x")
    ids, persons = identity(Fhir(named), {"@other:x": {"gp@praktijk.example"}})
    assert (await persons.lookup("@other:x")).person is None
    accounts_of, _ = await ids.resolver_for(by_reference(named))
    assert set(accounts_of("Practitioner/gp", named)) == {"@gp:x"}


@pytest_twisted.ensureDeferred
async def test_an_address_two_persons_carry_maps_nobody_and_is_counted() -> None:
    son = person("RelatedPerson", "son", "family@home.example")
    wife = person("RelatedPerson", "wife", "family@home.example")
    ids, persons = identity(Fhir(son, wife), {"@son:x": {"family@home.example"}})
    record = await persons.lookup("@son:x")
    assert (record.person, record.ambiguous) == (None, True)
    assert persons.ambiguous_emails == {"family@home.example"}
    accounts_of, _ = await ids.resolver_for(by_reference(son, wife))
    assert set(accounts_of("RelatedPerson/son", son)) == set()


@pytest_twisted.ensureDeferred
async def test_addresses_leading_to_two_persons_make_the_account_nobody_s() -> None:
    a = person("Practitioner", "a", "a@x.example")
    b = person("Practitioner", "b", "b@x.example")
    _, persons = identity(Fhir(a, b), {"@ab:x": {"a@x.example", "b@x.example"}})
    record = await persons.lookup("@ab:x")
    assert (record.person, record.ambiguous) == (None, True)


@pytest_twisted.ensureDeferred
async def test_one_person_two_accounts_by_two_addresses_admits_neither() -> None:
    # A shared practice mailbox on the record: whoever verified it would be the GP too.
    gp = person("Practitioner", "gp", "gp@praktijk.example", "balie@praktijk.example")
    accounts = {"@gp:x": {"gp@praktijk.example"}, "@desk:x": {"balie@praktijk.example"}}
    ids, _ = identity(Fhir(gp), accounts)
    accounts_of, _ = await ids.resolver_for(by_reference(gp))
    assert set(accounts_of("Practitioner/gp", gp)) == set()


@pytest_twisted.ensureDeferred
async def test_lookups_reveal_only_the_person_types_configured() -> None:
    gp = person("Practitioner", "gp", "gp@praktijk.example")
    patient = person("Patient", "kim", "kim@home.example")
    accounts = {"@gp:x": {"gp@praktijk.example"}, "@kim:x": {"kim@home.example"}}
    ids, _ = identity(Fhir(gp, patient), accounts)
    assert await ids.account_of_email("GP@praktijk.example") == "@gp:x"
    assert await ids.account_of_email("kim@home.example") is None  # a patient: not revealed
    assert await ids.account_of_email("nobody@home.example") is None


@pytest_twisted.ensureDeferred
async def test_a_spelling_read_in_a_team_is_searched_for_from_then_on() -> None:
    # FHIR servers match tokens exactly: "GP@Praktijk.example" is not found by the
    # account's canonical "gp@praktijk.example" until the module has read that spelling.
    gp = person("Practitioner", "gp", "GP@Praktijk.example")
    ids, persons = identity(Fhir(gp), {"@gp:x": {"gp@praktijk.example"}})
    assert (await persons.lookup("@gp:x")).person is None
    accounts_of, _ = await ids.resolver_for(by_reference(gp))  # a team load reads it
    assert set(accounts_of("Practitioner/gp", gp)) == {"@gp:x"}
    assert (await persons.lookup("@gp:x")).person == "Practitioner/gp"


class SqliteApi:
    """Synapse's 3PIDs from a dict and its database as an in-memory SQLite: enough for
    the real VerifiedEmails."""

    def __init__(self, threepids: dict[str, list[dict[str, Any]]]) -> None:
        self.threepids = threepids
        self._cursor = sqlite3.connect(":memory:").cursor()

    async def get_threepids_for_user(self, user_id: str) -> list[dict[str, Any]]:
        return list(self.threepids.get(user_id, []))

    async def run_db_interaction(self, desc: str, func: Any, *args: Any) -> Any:
        return func(self._cursor, *args)

    def get_qualified_user_id(self, localpart: str) -> str:
        return f"@{localpart}:x"


@pytest_twisted.ensureDeferred
async def test_a_leaver_s_verified_address_given_to_a_successor_is_not_the_successor() -> None:
    old_gp = person("Practitioner", "old-gp", "huisarts@praktijk.example")
    api = SqliteApi(
        {
            "@leaver:x": [
                {"medium": "email", "address": "huisarts@praktijk.example", "validated_at": 1000}
            ]
        }
    )
    emails = VerifiedEmails(api, enabled=True)  # type: ignore[arg-type]
    fhir = Fhir(old_gp)
    persons = PersonDirectory(fhir, emails=emails, email_identifier_systems=[OZO_EMAIL])  # type: ignore[arg-type]
    assert (await persons.lookup("@leaver:x")).person == "Practitioner/old-gp"

    # FHIR marks the address old on the leaver's record and gives it to the successor.
    old_gp["identifier"][0]["use"] = "old"
    fhir.resources = (old_gp, person("Practitioner", "new-gp", "huisarts@praktijk.example"))
    assert (await persons.lookup("@leaver:x")).person is None

    # Only a new verification of the address (whoever holds the mailbox now) moves it.
    api.threepids["@leaver:x"][0]["validated_at"] = 9000
    assert (await persons.lookup("@leaver:x")).person == "Practitioner/new-gp"


@pytest_twisted.ensureDeferred
async def test_spellings_one_instance_read_are_searched_by_every_other() -> None:
    gp = person("Practitioner", "gp", "GP@Praktijk.example")
    api = SqliteApi(
        {"@gp:x": [{"medium": "email", "address": "gp@praktijk.example", "validated_at": 1}]}
    )
    emails = VerifiedEmails(api, enabled=True)  # type: ignore[arg-type]
    one = PersonDirectory(Fhir(gp), emails=emails, email_identifier_systems=[OZO_EMAIL])  # type: ignore[arg-type]
    other = PersonDirectory(Fhir(gp), emails=emails, email_identifier_systems=[OZO_EMAIL])  # type: ignore[arg-type]
    assert (await other.lookup("@gp:x")).person is None  # nobody read the spelling yet
    one.learn_spellings([gp])  # (a team load on one instance)
    await one.save_spellings()
    assert (await other.lookup("@gp:x")).person == "Practitioner/gp"


@pytest_twisted.ensureDeferred
async def test_an_identity_provider_s_email_claim_identifies_nobody_unless_trusted() -> None:
    gp = person("Practitioner", "gp", "dr@hospital.example")
    claimed = [{"medium": "email", "address": "dr@hospital.example", "validated_at": 1}]
    api = SqliteApi({"@sso:x": claimed, "@pw:x": list(claimed)})
    for trusted, expected in ((False, None), (True, "Practitioner/gp")):
        emails = VerifiedEmails(api, enabled=True, trust_sso=trusted)  # type: ignore[arg-type]
        # Synapse asks the spam checker first, with the provider for single sign-on.
        assert await emails.check_registration_for_spam(None, "sso", [], "oidc-hospital") == (
            RegistrationBehaviour.ALLOW
        )
        persons = PersonDirectory(Fhir(gp), emails=emails, email_identifier_systems=[OZO_EMAIL])  # type: ignore[arg-type]
        assert (await persons.lookup("@sso:x")).person == expected
    # A registration with a password (no provider) is not marked.
    emails = VerifiedEmails(api, enabled=True)  # type: ignore[arg-type]
    await emails.check_registration_for_spam(None, "pw", [("ua", "127.0.0.1")], None)
    assert await emails.of_account("@pw:x") == {"dr@hospital.example": 1}
    assert await emails.of_account("@sso:x") == {}
