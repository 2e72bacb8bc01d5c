"""The person directory honours the accounts the registration gate recorded: an account
no person names maps to its recorded person, active as FHIR says; an explicit Matrix id
in a person's record wins."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest_twisted

from synapse_fhir_module.fhir.conventions import MATRIX_ID_SYSTEM
from synapse_fhir_module.fhir.person_directory import PersonDirectory


class PersonsInFhir:
    """Answers the directory's searches from a few resources, as FHIR would."""

    def __init__(self, *resources: dict[str, Any]) -> None:
        self.resources = list(resources)

    async def search_json(self, resource_type: str, params: Mapping[str, str]) -> list[dict]:
        of_type = [r for r in self.resources if r["resourceType"] == resource_type]
        if "_id" in params:
            ids = params["_id"].split(",")
            return [r for r in of_type if r["id"] in ids]
        if "identifier" in params:
            wanted = {v.split("|", 1)[1] for v in params["identifier"].split(",")}
            return [r for r in of_type if _identifier_values(r) & wanted]
        return []  # (the telecom form is not used here)


def _identifier_values(resource: dict[str, Any]) -> set[str]:
    return {i["value"] for i in resource.get("identifier", []) if i["system"] == MATRIX_ID_SYSTEM}


def directory(fhir: PersonsInFhir, records: dict[str, str]) -> PersonDirectory:
    """A directory over ``fhir`` with these accounts recorded (user id → person)."""

    async def persons_of(user_ids: Sequence[str]) -> Mapping[str, str]:
        return {u: records[u] for u in user_ids if u in records}

    return PersonDirectory(fhir, recorded_persons=persons_of)  # type: ignore[arg-type]


HENK = {"resourceType": "Patient", "id": "henk", "active": True}
ANNA = {
    "resourceType": "Practitioner",
    "id": "anna",
    "active": True,
    "identifier": [{"system": MATRIX_ID_SYSTEM, "value": "@anna:x"}],
}


@pytest_twisted.ensureDeferred
async def test_a_recorded_account_is_its_person_s_while_the_person_is_active() -> None:
    fhir = PersonsInFhir(dict(HENK))
    persons = directory(fhir, {"@henk:x": "Patient/henk"})
    record = await persons.lookup("@henk:x")
    assert (record.person, record.active) == ("Patient/henk", True)
    assert persons.users_of_person("Patient/henk") == ["@henk:x"]

    fhir.resources[0]["active"] = False
    record = await persons.lookup("@henk:x")
    assert (record.person, record.active) == ("Patient/henk", False)

    fhir.resources.clear()  # deleted from FHIR: still his, and not active
    record = await persons.lookup("@henk:x")
    assert (record.person, record.active) == ("Patient/henk", False)


@pytest_twisted.ensureDeferred
async def test_an_account_named_by_one_person_and_recorded_as_another_is_nobodys() -> None:
    # Registered by Henk's address first, named in Anna's record later: squatted or a data
    # error, either way it may act as neither.
    fhir = PersonsInFhir(ANNA, HENK)
    persons = directory(fhir, {"@anna:x": "Patient/henk"})
    record = await persons.lookup("@anna:x")
    assert (record.person, record.active, record.ambiguous) == (None, False, True)


@pytest_twisted.ensureDeferred
async def test_an_account_named_and_recorded_as_the_same_person_is_theirs() -> None:
    persons = directory(PersonsInFhir(ANNA), {"@anna:x": "Practitioner/anna"})
    record = await persons.lookup("@anna:x")
    assert (record.person, record.active) == ("Practitioner/anna", True)


@pytest_twisted.ensureDeferred
async def test_unrecorded_and_unnamed_accounts_stay_unmapped() -> None:
    persons = directory(PersonsInFhir(ANNA), {})
    record = await persons.lookup("@eve:x")
    assert not record.mapped


@pytest_twisted.ensureDeferred
async def test_the_gate_sees_only_explicit_names() -> None:
    persons = directory(PersonsInFhir(ANNA, HENK), {"@henk:x": "Patient/henk"})
    assert list(await persons.persons_naming("@anna:x")) == ["Practitioner/anna"]
    assert await persons.persons_naming("@henk:x") == {}
