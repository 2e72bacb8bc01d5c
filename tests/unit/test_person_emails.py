"""A person's email addresses (identity.emails_of) and the FHIR searches that find them."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from synapse_fhir_module.identity import (
    PERSON_TYPES,
    email_searches,
    emails_of,
    normalise_email,
)


def test_telecom_emails_only() -> None:
    person = {
        "telecom": [
            {"system": "email", "value": " Anna.Smith@Example.org "},
            {"system": "email", "value": "anna@home.example"},
            {"system": "url", "value": "mailto:not-this@example.org"},
            {"system": "phone", "value": "+31 20 555 0000"},
            {"system": "email"},
            {"system": "email", "value": "   "},
            "garbage",
        ],
        "identifier": [{"system": "email", "value": "nor-this@example.org"}],
    }
    assert emails_of(person) == {"anna.smith@example.org", "anna@home.example"}


def test_no_telecom() -> None:
    assert emails_of({}) == set()
    assert emails_of({"telecom": "not a list"}) == set()


addresses = st.emails()


@given(address=addresses, spaces=st.sampled_from(["", " ", "\t", "  \n"]))
def test_case_and_surrounding_spaces_do_not_matter(address: str, spaces: str) -> None:
    for variant in (address.upper(), address.lower(), address.swapcase()):
        stored = {"telecom": [{"system": "email", "value": f"{spaces}{variant}{spaces}"}]}
        assert normalise_email(address) in emails_of(stored)


@given(address=addresses)
def test_normalising_twice_changes_nothing(address: str) -> None:
    assert normalise_email(normalise_email(address)) == normalise_email(address)


def test_searches_cover_every_person_type_and_escape_search_syntax() -> None:
    searches = email_searches(" a|b,c$d\\e@example.org ")
    assert [resource_type for resource_type, _ in searches] == list(PERSON_TYPES)
    # "|" would split system from value and "," would OR two values.
    assert {params["email"] for _, params in searches} == {"a\\|b\\,c\\$d\\\\e@example.org"}


def test_an_address_the_person_no_longer_has_is_not_theirs() -> None:
    person = {
        "telecom": [
            {"system": "email", "value": "old@example.org", "use": "old"},
            {"system": "email", "value": "ended@example.org", "period": {"end": "2020-01-01"}},
            {"system": "email", "value": "now@example.org", "use": "work"},
        ]
    }
    assert emails_of(person) == {"now@example.org"}
