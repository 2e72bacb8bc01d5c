"""Both forms of a Matrix identity on a FHIR person are recognised."""

from __future__ import annotations

from synapse_fhir_module.fhir.persons import (
    is_active,
    matrix_ids_of,
    matrix_uri,
    person_searches,
    user_id_from_uri,
)


def test_telecom_uri_form() -> None:
    person = {"telecom": [{"system": "url", "value": "matrix:u/alice:example.org"}]}
    assert matrix_ids_of(person) == {"@alice:example.org"}


def test_identifier_form() -> None:
    person = {"identifier": [{"system": "https://matrix.org/user-id", "value": "@bob:example.org"}]}
    assert matrix_ids_of(person) == {"@bob:example.org"}


def test_both_forms_and_noise() -> None:
    person = {
        "telecom": [
            {"system": "email", "value": "matrix:u/not-this:example.org"},
            {"system": "url", "value": "https://example.org/alice"},
            {"system": "url", "value": "matrix:u/alice:example.org"},
            # Forms FHIR's token search cannot find by the account's id name nobody.
            {"system": "url", "value": "matrix:u/carol:example.org?action=chat"},
            {"system": "url", "value": "matrix:u/dave:example.org#x"},
            "garbage",
        ],
        "identifier": [
            {"system": "http://fhir.nl/fhir/NamingSystem/bsn", "value": "123456782"},
            {"system": "https://matrix.org/user-id", "value": "not-a-user-id"},
            {"system": "https://matrix.org/user-id", "value": "@alice2:example.org"},
        ],
    }
    assert matrix_ids_of(person) == {"@alice:example.org", "@alice2:example.org"}


def test_uri_round_trip() -> None:
    assert matrix_uri("@alice:example.org") == "matrix:u/alice:example.org"
    assert user_id_from_uri("matrix:u/alice:example.org:8448") == "@alice:example.org:8448"
    assert user_id_from_uri("matrix:r/room:example.org") is None
    assert user_id_from_uri("matrix:u/nolocalpart") is None


def test_active_defaults_to_true() -> None:
    assert is_active({}) is True
    assert is_active({"active": True}) is True
    assert is_active({"active": False}) is False
    assert is_active({"active": "false"}) is False  # malformed: not active (fail closed)
    assert is_active({"active": None}) is False


def test_searches_cover_every_person_type_and_all_three_forms() -> None:
    searches = person_searches(["@alice:example.org"])
    assert len(searches) == 6
    assert (
        "Practitioner",
        {"telecom": "url|matrix:u/alice:example.org,other|@alice:example.org"},
    ) in searches
    assert ("Patient", {"identifier": "https://matrix.org/user-id|@alice:example.org"}) in searches


def test_searches_or_several_users_together() -> None:
    searches = person_searches(["@a:example.org", "@b:example.org"])
    assert len(searches) == 6
    assert (
        "RelatedPerson",
        {
            "telecom": "url|matrix:u/a:example.org,other|@a:example.org,"
            "url|matrix:u/b:example.org,other|@b:example.org"
        },
    ) in searches


NUTS_PURPOSE = "http://example.org/fhir/StructureDefinition/contactpoint-purpose"


def nuts_telecom(value: str, **extension: object) -> dict[str, object]:
    return {
        "system": "other",
        "value": value,
        "extension": [{"url": NUTS_PURPOSE, **extension}],
    }


def test_the_nuts_form_names_an_account_only_when_marked_for_matrix_messaging() -> None:
    marked = {"coding": [{"system": "http://example.org/purpose", "code": "matrix-messaging"}]}
    assert matrix_ids_of(
        {"telecom": [nuts_telecom("@alice:example.org", valueCodeableConcept=marked)]}
    ) == {"@alice:example.org"}
    assert matrix_ids_of(
        {"telecom": [nuts_telecom("@bob:example.org", valueCoding={"code": "matrix-messaging"})]}
    ) == {"@bob:example.org"}
    # Unmarked, marked for something else, or not a Matrix id: nobody.
    assert matrix_ids_of({"telecom": [{"system": "other", "value": "@eve:example.org"}]}) == set()
    assert (
        matrix_ids_of({"telecom": [nuts_telecom("@eve:example.org", valueCode="phone-messaging")]})
        == set()
    )
    assert (
        matrix_ids_of({"telecom": [nuts_telecom("eve:example.org", valueCode="matrix-messaging")]})
        == set()
    )
    assert (
        matrix_ids_of(
            {"telecom": [nuts_telecom("@eve:example.org,@x:y", valueCode="matrix-messaging")]}
        )
        == set()
    )
    # An extension of another name with the right code does not count.
    other = {
        "system": "other",
        "value": "@eve:example.org",
        "extension": [
            {"url": "http://example.org/purpose-of-use", "valueCode": "matrix-messaging"}
        ],
    }
    assert matrix_ids_of({"telecom": [other]}) == set()
