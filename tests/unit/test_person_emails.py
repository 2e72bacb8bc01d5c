"""A person's email addresses (identity.emails_of) and the FHIR searches that find them."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from synapse_fhir_module.fhir.conventions import PERSON_TYPES
from synapse_fhir_module.fhir.persons import (
    email_searches,
    emails_of,
    identity_searches,
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
    searches = email_searches([" a|b,c$d\\e@example.org "])
    assert [resource_type for resource_type, _ in searches] == list(PERSON_TYPES)
    # "|" would split system from value and "," would OR two values.
    assert {params["telecom"] for _, params in searches} == {"email|a\\|b\\,c\\$d\\\\e@example.org"}


def test_an_address_the_person_no_longer_has_is_not_theirs() -> None:
    person = {
        "telecom": [
            {"system": "email", "value": "old@example.org", "use": "old"},
            {"system": "email", "value": "ended@example.org", "period": {"end": "2020-01-01"}},
            {"system": "email", "value": "now@example.org", "use": "work"},
        ]
    }
    assert emails_of(person) == {"now@example.org"}


OZO_EMAIL = "https://www.ozoverbindzorg.nl/namingsystem/email"


def test_identifiers_of_a_listed_system_are_addresses_too() -> None:
    practitioner = {
        "identifier": [
            {"system": OZO_EMAIL, "value": "H.Jansen@Praktijk.example"},
            {"system": OZO_EMAIL, "value": "former@praktijk.example", "use": "old"},
            {"system": "http://fhir.nl/fhir/NamingSystem/uzi-nr-pers", "value": "12345"},
            {"system": OZO_EMAIL, "value": "not an address"},
        ]
    }
    assert emails_of(practitioner) == set()  # the system is not listed
    assert emails_of(practitioner, [OZO_EMAIL]) == {"h.jansen@praktijk.example"}


def test_searches_or_the_addresses_and_cover_each_identifier_system() -> None:
    searches = email_searches(["b@example.org", "a@example.org", "a@example.org"], [OZO_EMAIL])
    assert ("Patient", {"telecom": "email|a@example.org,email|b@example.org"}) in searches
    assert (
        "Practitioner",
        {"identifier": f"{OZO_EMAIL}|a@example.org,{OZO_EMAIL}|b@example.org"},
    ) in searches
    assert len(searches) == 2 * len(PERSON_TYPES)
    assert email_searches([]) == []


@given(
    telecom=st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                "system": st.sampled_from(["email", "phone", "url", 3, None]),
                "value": st.one_of(st.text(max_size=30), st.emails(), st.integers()),
                "use": st.sampled_from(["work", "home", "old", None, 1]),
                "period": st.one_of(
                    st.none(),
                    st.text(max_size=5),
                    st.fixed_dictionaries({}, optional={"end": st.text(max_size=25)}),
                ),
            },
        )
        | st.text(max_size=5),
        max_size=6,
    ),
    identifier=st.one_of(
        st.none(),
        st.text(max_size=5),
        st.lists(
            st.dictionaries(
                st.sampled_from(["system", "value", "use", "period"]),
                st.one_of(st.text(max_size=20), st.sampled_from([OZO_EMAIL]), st.integers()),
            ),
            max_size=4,
        ),
    ),
)
def test_any_json_gives_normalised_addresses_and_never_raises(
    telecom: list[object], identifier: object
) -> None:
    found = emails_of({"telecom": telecom, "identifier": identifier}, [OZO_EMAIL])
    for address in found:
        assert address == normalise_email(address)
        assert "@" in address and not any(c.isspace() for c in address)


def test_one_round_finds_who_names_the_accounts_and_who_carries_the_addresses() -> None:
    searches = identity_searches(["@a:example.org"], ["a@example.org"], [OZO_EMAIL])
    assert len(searches) == 2 * len(PERSON_TYPES)
    assert (
        "RelatedPerson",
        {"identifier": f"https://matrix.org/user-id|@a:example.org,{OZO_EMAIL}|a@example.org"},
    ) in searches
    assert (
        "Patient",
        {"telecom": "url|matrix:u/a:example.org,other|@a:example.org,email|a@example.org"},
    ) in searches
    # A malformed Matrix id is left out, not searched for (a comma would OR in a token).
    assert identity_searches(["@a:example.org,other|@b:x"], []) == []


def test_addresses_compare_as_synapse_canonicalises_them() -> None:
    # The local part case-folded, the domain only lower-cased: two domains stay two.
    assert normalise_email(" Jan.de.Vries@Praktijk.NL ") == "jan.de.vries@praktijk.nl"
    assert normalise_email("STRASSE@fußpflege.de") == "strasse@fußpflege.de"
    assert normalise_email("info@fußpflege.de") != normalise_email("info@fusspflege.de")
    assert normalise_email("no-at-sign") == ""
    assert normalise_email("a@b@c.example") == ""


def test_only_plain_addresses_are_a_person_s() -> None:
    # A mailer would deliver each of these to victim@x.example: as two addresses they
    # would each get their own invitation.
    for value in ("(1)victim@x.example", "victim@x.example,2", "Victim <victim@x.example>"):
        assert emails_of({"telecom": [{"system": "email", "value": value}]}) == set()
    assert emails_of({"telecom": [{"system": "email", "value": "a@localhost"}]}) == set()


def test_long_token_lists_are_split_so_no_search_url_grows_past_what_servers_take() -> None:
    addresses = [f"person{i:04d}-with-a-long-address@hospital.example" for i in range(200)]
    searches = identity_searches([], addresses, [OZO_EMAIL])
    values = [value for _, params in searches for value in params.values()]
    assert all(len(value) <= 1500 for value in values)
    # Every address is still searched for, under each form, for each person type.
    joined = ",".join(values)
    assert all(joined.count(address) == 2 * len(PERSON_TYPES) for address in addresses)
