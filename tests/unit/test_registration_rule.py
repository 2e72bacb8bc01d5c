"""Which person a registration identifies (registration_rule.identify), by example and by
property over every combination of persons found for the username and the email."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from synapse_fhir_module.enforcement.registration_rule import (
    Candidate,
    Establishment,
    Identified,
    Refusal,
    identify,
)

ANNA = Candidate("Practitioner/anna", active=True, names_an_account=True)
HENK = Candidate("Patient/henk", active=True, names_an_account=False)
OLD = Candidate("RelatedPerson/old", active=False, names_an_account=False)
IVO = Candidate("Practitioner/ivo", active=False, names_an_account=True)
TWIN = Candidate("Patient/twin", active=True, names_an_account=True)


def test_username_and_email_of_the_same_active_person() -> None:
    assert identify([ANNA], [ANNA]) == Identified(
        "Practitioner/anna", Establishment.USERNAME_AND_EMAIL
    )


def test_email_alone_of_one_active_person_without_an_account() -> None:
    assert identify([], [HENK]) == Identified("Patient/henk", Establishment.EMAIL)


def test_the_refusals() -> None:
    assert identify([ANNA], None) is Refusal.NO_VERIFIED_EMAIL
    assert identify([], None) is Refusal.NO_VERIFIED_EMAIL
    assert identify([ANNA], [HENK]) is Refusal.EMAIL_NOT_THE_USERNAME_PERSON
    assert identify([ANNA], []) is Refusal.EMAIL_NOT_THE_USERNAME_PERSON
    assert identify([ANNA], [ANNA, OLD]) is Refusal.EMAIL_CARRIED_BY_SEVERAL
    assert identify([], [HENK, OLD]) is Refusal.EMAIL_CARRIED_BY_SEVERAL  # one inactive
    assert identify([], []) is Refusal.EMAIL_CARRIED_BY_NOBODY
    assert identify([IVO], [IVO]) is Refusal.USERNAME_PERSON_INACTIVE
    assert identify([ANNA, TWIN], [ANNA]) is Refusal.USERNAME_NAMED_BY_SEVERAL
    assert identify([ANNA, IVO], [ANNA]) is Refusal.USERNAME_NAMED_BY_SEVERAL  # one inactive
    assert identify([], [OLD]) is Refusal.EMAIL_PERSON_INACTIVE
    # Anna's record names her account: her address does not open another one.
    assert identify([], [ANNA]) is Refusal.EMAIL_PERSON_NAMES_ANOTHER_ACCOUNT
    # Henk's address made his account already: it does not make a second.
    henk_registered = Candidate("Patient/henk", True, False, has_recorded_account=True)
    assert identify([], [henk_registered]) is Refusal.EMAIL_PERSON_HAS_AN_ACCOUNT


def test_one_person_seen_differently_by_the_two_searches_is_refused() -> None:
    # (Anna turned inactive between the username search and the email search.)
    anna_later = Candidate("Practitioner/anna", active=False, names_an_account=True)
    assert isinstance(identify([ANNA], [anna_later]), Refusal)


candidates = st.builds(
    Candidate,
    reference=st.sampled_from(
        ["Practitioner/1", "Practitioner/2", "Patient/1", "RelatedPerson/3", "Patient/4"]
    ),
    active=st.booleans(),
    names_an_account=st.booleans(),
)
persons = st.lists(candidates, max_size=4)
emails = st.none() | persons


@given(named_by=persons, carriers=emails)
def test_whoever_is_identified_is_the_one_active_carrier_of_the_verified_email(
    named_by: list[Candidate], carriers: list[Candidate] | None
) -> None:
    decision = identify(named_by, carriers)
    if isinstance(decision, Identified):
        assert carriers is not None  # never without a verified email
        (carrier,) = set(carriers)  # the address is this one person's alone
        assert carrier.reference == decision.person
        assert carrier.active


@given(named_by=persons, carriers=emails)
def test_a_named_username_is_only_ever_its_own_person_s_account(
    named_by: list[Candidate], carriers: list[Candidate] | None
) -> None:
    decision = identify(named_by, carriers)
    if named_by and isinstance(decision, Identified):
        (named,) = set(named_by)
        assert decision.person == named.reference and named.active
        assert decision.established_by is Establishment.USERNAME_AND_EMAIL
    if not named_by and isinstance(decision, Identified):
        assert decision.established_by is Establishment.EMAIL


@given(named_by=persons, carriers=emails)
def test_several_persons_on_either_side_identify_nobody(
    named_by: list[Candidate], carriers: list[Candidate] | None
) -> None:
    if len(set(named_by)) > 1 or (carriers is not None and len(set(carriers)) > 1):
        assert isinstance(identify(named_by, carriers), Refusal)


@given(named_by=persons, carriers=emails, data=st.data())
def test_the_order_in_which_fhir_returned_them_does_not_matter(
    named_by: list[Candidate], carriers: list[Candidate] | None, data: st.DataObject
) -> None:
    shuffled_named = data.draw(st.permutations(named_by))
    shuffled_carriers = None if carriers is None else data.draw(st.permutations(carriers))
    assert identify(shuffled_named, shuffled_carriers) == identify(named_by, carriers)


@given(person=candidates)
def test_an_active_person_with_their_own_email_is_always_identified(person: Candidate) -> None:
    if person.active:
        assert identify([person], [person]) == Identified(
            person.reference, Establishment.USERNAME_AND_EMAIL
        )
