"""Which person a registration identifies, or why none: the rule against squatting.

A pure function of what FHIR says about the username and about the verified email
address, so it is tested without a server. A registration identifies person P when

- the username is named by P alone, P is active, and the verified email is carried by
  P alone (``USERNAME_AND_EMAIL``); or
- no person names the username, and the verified email is carried by P alone, P is
  active, names no Matrix account of its own and has none recorded yet (``EMAIL``): the
  account becomes P's. (One such account per person: someone who can read P's mailbox
  cannot collect usernames for P.)

Anything else identifies nobody. An address several persons carry identifies none of
them, whether they are active or not: a shared mailbox cannot tell who registers. (Of
the persons FHIR's email search finds: HAPI matches it exactly, so addresses are to be
kept in lower case in FHIR.)
"""

from __future__ import annotations

from collections.abc import Collection
from enum import Enum

import attr


class Establishment(str, Enum):
    """How an account was tied to its person (stored with the account)."""

    USERNAME_AND_EMAIL = "username_and_email"
    EMAIL = "email"


class Refusal(str, Enum):
    """Why a registration identifies nobody (for the log; the client sees one reason)."""

    USERNAME_NAMED_BY_SEVERAL = "username_named_by_several_persons"
    USERNAME_PERSON_INACTIVE = "username_person_inactive"
    NO_VERIFIED_EMAIL = "no_verified_email"
    EMAIL_CARRIED_BY_NOBODY = "email_carried_by_nobody"
    EMAIL_CARRIED_BY_SEVERAL = "email_carried_by_several_persons"
    EMAIL_NOT_THE_USERNAME_PERSON = "email_not_of_the_username_person"
    EMAIL_PERSON_INACTIVE = "email_person_inactive"
    # The person's record names its Matrix account already: that account is theirs.
    EMAIL_PERSON_NAMES_ANOTHER_ACCOUNT = "email_person_names_another_account"
    # An earlier registration by the email alone made the person's account already.
    EMAIL_PERSON_HAS_AN_ACCOUNT = "email_person_has_an_account"


@attr.s(frozen=True, auto_attribs=True)
class Candidate:
    """A FHIR person found for a username or an email address."""

    reference: str  # "Practitioner/12"
    active: bool
    names_an_account: bool  # whether its record names any Matrix user id
    # Whether an account was recorded as this person's already (by an earlier registration).
    # (Not part of what makes two sightings of a person the same.)
    has_recorded_account: bool = attr.ib(default=False, eq=False)


@attr.s(frozen=True, auto_attribs=True)
class Identified:
    person: str
    established_by: Establishment


def identify(
    named_by: Collection[Candidate], email_carried_by: Collection[Candidate] | None
) -> Identified | Refusal:
    """The person this registration is, or why it is nobody.

    ``named_by``: the persons whose record names the username's Matrix id.
    ``email_carried_by``: the persons carrying the verified email address; None when the
    registration has no verified email.
    """
    named = set(named_by)
    carriers = None if email_carried_by is None else set(email_carried_by)
    if named:
        if len(named) > 1:
            return Refusal.USERNAME_NAMED_BY_SEVERAL
        (person,) = named
        if not person.active:
            return Refusal.USERNAME_PERSON_INACTIVE
        if carriers is None:
            return Refusal.NO_VERIFIED_EMAIL
        if len(carriers) > 1:
            return Refusal.EMAIL_CARRIED_BY_SEVERAL
        if carriers != {person}:  # (P as both searches saw it: a change in between refuses)
            return Refusal.EMAIL_NOT_THE_USERNAME_PERSON
        return Identified(person.reference, Establishment.USERNAME_AND_EMAIL)
    if carriers is None:
        return Refusal.NO_VERIFIED_EMAIL
    if not carriers:
        return Refusal.EMAIL_CARRIED_BY_NOBODY
    if len(carriers) > 1:
        return Refusal.EMAIL_CARRIED_BY_SEVERAL
    (person,) = carriers
    if not person.active:
        return Refusal.EMAIL_PERSON_INACTIVE
    if person.names_an_account:
        return Refusal.EMAIL_PERSON_NAMES_ANOTHER_ACCOUNT
    if person.has_recorded_account:
        return Refusal.EMAIL_PERSON_HAS_AN_ACCOUNT
    return Identified(person.reference, Establishment.EMAIL)
