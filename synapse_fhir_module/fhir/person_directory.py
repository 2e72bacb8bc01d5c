"""Matrix user id → the FHIR person that names it, and whether that person is active.

Looked up with FHIR token searches on the explicit identity forms over the three person
types, six searches per group of users. An account no person names explicitly, but that
the registration gate recorded as a person's (``registered_accounts``), maps to that
person, active as its FHIR resource says. Failing both, an account is the person that
carries one of its verified email addresses (Synapse's own 3PIDs), when exactly one
person carries it, no other address of the account points elsewhere, and that person
names no Matrix account explicitly. Explicit ids win over the record, the record over
email; two persons on one address make it nobody's (never a guess).
Answers are remembered (positive and negative) so that account validity, which runs on
every request, reads memory only; ``refresh`` re-asks FHIR in the background, and while
FHIR is unreachable the last known answer stands.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, Protocol

import attr

from synapse_fhir_module.fhir.client import FhirClient
from synapse_fhir_module.fhir.conventions import PERSON_TYPES, dicts_in
from synapse_fhir_module.fhir.persons import (
    emails_of,
    identity_searches,
    is_active,
    matrix_ids_of,
    normalise_email,
)

logger = logging.getLogger(__name__)

# Spellings of one address remembered for searches.
MAX_SPELLINGS = 4
# Users asked about in one round of searches (their ids are ORed into each search URL).
USERS_PER_BATCH = 25

# user ids → {user_id: "Practitioner/12"} for the accounts recorded as a person's.
RecordedPersons = Callable[[Sequence[str]], Awaitable[Mapping[str, str]]]


class EmailRecords(Protocol):
    """The account side of identity by email (``verified_emails.VerifiedEmails``)."""

    async def of_account(self, user_id: str) -> dict[str, int]:
        """The account's verified addresses (normalised) → when verified (ms)."""

    async def spellings(self, addresses: Collection[str]) -> dict[str, set[str]]: ...

    async def remember_spellings(self, pairs: Collection[tuple[str, str]]) -> None: ...

    async def confirm_tie(
        self, user_id: str, address: str, person: str, validated: int
    ) -> bool: ...


# "Practitioner/12" → its resource
Persons = dict[str, dict[str, Any]]


async def no_recorded_persons(user_ids: Sequence[str]) -> Mapping[str, str]:
    return {}


class NoEmails:
    """Identity by email off: no account has an address."""

    async def of_account(self, user_id: str) -> dict[str, int]:
        return {}

    async def spellings(self, addresses: Collection[str]) -> dict[str, set[str]]:
        return {}

    async def remember_spellings(self, pairs: Collection[tuple[str, str]]) -> None:
        pass

    async def confirm_tie(self, user_id: str, address: str, person: str, validated: int) -> bool:
        return False


@attr.s(frozen=True, auto_attribs=True)
class PersonRecord:
    """What FHIR said about one Matrix account."""

    user_id: str
    person: str | None  # "Practitioner/12"; None when no single person names the account
    active: bool
    checked_at: float
    ambiguous: bool = False
    # How the tie was made: "explicit", "recorded", "email" (None when unmapped).
    by: str | None = None

    @property
    def mapped(self) -> bool:
        return self.person is not None


class PersonDirectory:
    def __init__(
        self,
        fhir: FhirClient,
        *,
        recorded_persons: RecordedPersons = no_recorded_persons,
        emails: EmailRecords | None = None,
        email_identifier_systems: Sequence[str] = (),
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self._fhir = fhir
        self._recorded_persons = recorded_persons
        self._emails: EmailRecords = emails if emails is not None else NoEmails()
        self._identifier_systems = tuple(email_identifier_systems)
        self._monotonic = monotonic
        self._records: dict[str, PersonRecord] = {}
        # Normalised address → how FHIR records spelled it (FHIR servers match tokens
        # exactly, so a search must use the record's spelling to find it).
        self._spellings: dict[str, set[str]] = {}
        # Learned here and not yet stored for the other instances (and after a restart).
        self._unsaved_spellings: set[tuple[str, str]] = set()
        # Addresses that several persons carry, as last seen (for /health).
        self.ambiguous_emails: set[str] = set()

    def emails_of(self, person: Mapping[str, Any]) -> set[str]:
        """The person's addresses (``identity.emails_of`` under this server's systems)."""
        return emails_of(person, self._identifier_systems)

    def learn_spellings(self, persons: Iterable[Mapping[str, Any]]) -> None:
        """Remember how these resources spell their addresses, for later searches."""
        for person in persons:
            for telecom in dicts_in(person.get("telecom")):
                if telecom.get("system") == "email" and isinstance(telecom.get("value"), str):
                    self._spell(telecom["value"])
            for identifier in dicts_in(person.get("identifier")):
                value = identifier.get("value")
                if identifier.get("system") in self._identifier_systems and isinstance(value, str):
                    self._spell(value)

    def _spell(self, value: str) -> None:
        spelled = value.strip()
        normalised = normalise_email(spelled)
        if normalised and spelled != normalised:
            known = self._spellings.setdefault(normalised, set())
            # (A record can spell an address many ways; a few are enough to search with.)
            if len(known) < MAX_SPELLINGS and spelled not in known:
                known.add(spelled)
                self._unsaved_spellings.add((normalised, spelled))

    async def save_spellings(self) -> None:
        """Store the spellings learned here, for every instance."""
        if self._unsaved_spellings:
            pairs, self._unsaved_spellings = self._unsaved_spellings, set()
            await self._emails.remember_spellings(pairs)

    async def persons_carrying(self, addresses: Iterable[str]) -> dict[str, Persons]:
        """For each address (normalised), the persons carrying it, asked of FHIR now."""
        return (await self._search((), addresses))[1]

    async def _search(
        self, user_ids: Sequence[str], addresses: Iterable[str]
    ) -> tuple[dict[str, Persons], dict[str, Persons]]:
        """The persons naming each of ``user_ids`` and those carrying each of
        ``addresses`` (normalised), in one round of searches (two per person type)."""
        wanted = {normalise_email(address) for address in addresses} - {""}
        named: dict[str, Persons] = {user_id: {} for user_id in user_ids}
        carrying: dict[str, Persons] = {address: {} for address in wanted}
        await self.save_spellings()
        spellings = set(wanted)
        for spelled in (await self._emails.spellings(wanted)).values():
            spellings |= set(sorted(spelled)[:MAX_SPELLINGS])
        for address in wanted:
            spellings |= self._spellings.get(address, set())
        # Plain searches one after another, not a `batch` Bundle of them: HAPI runs batch
        # entries in parallel, and many searches at once can exhaust its database pool.
        searches = identity_searches(list(user_ids), sorted(spellings), self._identifier_systems)
        for resource_type, params in searches:
            for person in await self._fhir.search_json(resource_type, params):
                if person.get("resourceType") != resource_type or not person.get("id"):
                    continue
                reference = f"{resource_type}/{person['id']}"
                # The token search matched; check what the person really says.
                for user_id in matrix_ids_of(person) & named.keys():
                    named[user_id][reference] = person
                self.learn_spellings([person])
                for address in self.emails_of(person) & wanted:
                    carrying[address][reference] = person
        await self.save_spellings()
        for address, persons in carrying.items():
            if len(persons) > 1:
                self.ambiguous_emails.add(address)
            else:
                self.ambiguous_emails.discard(address)
        return named, carrying

    def remembered(self, user_id: str) -> PersonRecord | None:
        """The last answer for ``user_id``, from memory only."""
        return self._records.get(user_id)

    def remembered_users(self) -> list[str]:
        return list(self._records)

    def users_of_person(self, person_ref: str) -> list[str]:
        return [r.user_id for r in self._records.values() if r.person == person_ref]

    async def lookup(self, user_id: str) -> PersonRecord:
        """Ask FHIR now (raises FhirError when it can't answer)."""
        (record,) = await self.refresh([user_id])
        return record

    async def refresh(self, user_ids: Iterable[str]) -> list[PersonRecord]:
        """Ask FHIR about these users, in batches; remember and return the answers."""
        records = await self.ask(user_ids)
        for record in records:
            self._records[record.user_id] = record
        return records

    async def ask(self, user_ids: Iterable[str]) -> list[PersonRecord]:
        """Ask FHIR about these users, in batches, and return the answers without
        remembering them (``remembered_users``, which account validity re-asks about,
        does not grow)."""
        users = list(dict.fromkeys(user_ids))
        records = []
        for start in range(0, len(users), USERS_PER_BATCH):
            records.extend(await self._lookup_batch(users[start : start + USERS_PER_BATCH]))
        return records

    async def persons_naming(self, user_id: str) -> dict[str, dict[str, Any]]:
        """The persons whose record names ``user_id`` (``{"Practitioner/12": resource}``),
        asked of FHIR now; no memory, no recorded accounts."""
        return (await self._search([user_id], ()))[0][user_id]

    async def _lookup_batch(self, user_ids: Sequence[str]) -> list[PersonRecord]:
        # Addresses first, so one round of searches finds who names and who carries.
        addresses = {user_id: await self._emails.of_account(user_id) for user_id in user_ids}
        named, carriers = await self._search(user_ids, set().union(*addresses.values()))
        recorded = dict(await self._recorded_persons(list(user_ids)))
        unnamed = {user_id: recorded[user_id] for user_id in recorded if not named[user_id]}
        resources = await self.read_persons(set(unnamed.values()))
        now = self._monotonic()
        by_email = {
            user_id: await self._tied(
                _email_record(user_id, set(addresses[user_id]), carriers, now),
                addresses[user_id],
                carriers,
            )
            for user_id in user_ids
            if addresses[user_id] and not named[user_id] and user_id not in unnamed
        }
        records = []
        for user_id in user_ids:
            if user_id in unnamed:
                records.append(_recorded_record(user_id, unnamed[user_id], resources, now))
                continue
            if user_id in by_email:
                records.append(by_email[user_id])
                continue
            record = _record(user_id, named[user_id], now)
            if user_id in recorded and record.person not in (None, recorded[user_id]):
                # Registered as one person's, named since by another's record (the name was
                # taken first): nobody's until the data says one thing.
                logger.warning(
                    "An account recorded as %s is named by %s; treating it as unmapped",
                    recorded[user_id],
                    record.person,
                )
                record = PersonRecord(user_id, None, False, now, ambiguous=True)
            records.append(record)
        return records

    async def _tied(
        self, record: PersonRecord, verified: Mapping[str, int], carriers: Mapping[str, Persons]
    ) -> PersonRecord:
        """The record, if each address that makes it was verified for that person: an
        address that led this account to someone else before must be verified again
        (a leaver's old address given to a successor carries nothing over)."""
        if record.person is None:
            return record
        for address in sorted(verified):
            if record.person not in carriers.get(address, {}):
                continue
            if not await self._emails.confirm_tie(
                record.user_id, address, record.person, verified[address]
            ):
                logger.warning(
                    "An account's verified email led to another person before; it now leads"
                    " to %s: unmapped until the account verifies it again",
                    record.person,
                )
                return PersonRecord(record.user_id, None, False, record.checked_at)
        return record

    async def read_persons(self, references: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The current resources of these persons (one search per type); a deleted one,
        or a reference to anything but a person, is left out."""
        ids_by_type: dict[str, list[str]] = {}
        for reference in references:
            resource_type, _, resource_id = reference.partition("/")
            if resource_type in PERSON_TYPES and resource_id:
                ids_by_type.setdefault(resource_type, []).append(resource_id)
        found: dict[str, dict[str, Any]] = {}
        for resource_type, ids in sorted(ids_by_type.items()):
            params = {"_id": ",".join(sorted(ids))}
            for person in await self._fhir.search_json(resource_type, params):
                if person.get("resourceType") == resource_type and person.get("id") in ids:
                    found[f"{resource_type}/{person['id']}"] = person
        return found


def _email_record(
    user_id: str, addresses: set[str], carriers: Mapping[str, Persons], now: float
) -> PersonRecord:
    """Whose account this is by its addresses: one person for all of them that carry
    any, that person alone on each, and naming no account explicitly (an explicit id
    says which account is theirs, and it is not this one)."""
    persons: Persons = {}
    for address in sorted(addresses):
        on_address = carriers.get(address, {})
        if len(on_address) > 1:
            logger.warning(
                "An account's verified email is carried by %d persons (%s); treating it as "
                "unmapped",
                len(on_address),
                ", ".join(sorted(on_address)),
            )
            return PersonRecord(user_id, None, False, now, ambiguous=True)
        persons.update(on_address)
    if len(persons) > 1:
        logger.warning(
            "An account's verified emails lead to %d persons (%s); treating it as unmapped",
            len(persons),
            ", ".join(sorted(persons)),
        )
        return PersonRecord(user_id, None, False, now, ambiguous=True)
    if not persons:
        return PersonRecord(user_id, None, False, now)
    ((reference, person),) = persons.items()
    if matrix_ids_of(person):
        return PersonRecord(user_id, None, False, now)
    return PersonRecord(user_id, reference, is_active(person), now, by="email")


def _recorded_record(
    user_id: str, person: str, resources: Mapping[str, dict[str, Any]], now: float
) -> PersonRecord:
    """An account recorded as ``person``'s: active while that person is (a person gone
    from FHIR is not active)."""
    resource = resources.get(person)
    active = resource is not None and is_active(resource)
    return PersonRecord(user_id, person, active, now, by="recorded")


def _record(user_id: str, persons: dict[str, dict[str, Any]], now: float) -> PersonRecord:
    active = sorted(ref for ref, person in persons.items() if is_active(person))
    if len(active) == 1:
        return PersonRecord(user_id, active[0], True, now, by="explicit")
    if len(active) > 1:
        # A data error in the directory: nobody may act as either person.
        logger.warning(
            "One Matrix account is named by %d active persons (%s); treating it as unmapped",
            len(active),
            ", ".join(active),
        )
        return PersonRecord(user_id, None, False, now, ambiguous=True)
    if persons:
        return PersonRecord(user_id, sorted(persons)[0], False, now, by="explicit")
    return PersonRecord(user_id, None, False, now)
