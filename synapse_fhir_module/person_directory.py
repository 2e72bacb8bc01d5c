"""Matrix user id → the FHIR person that names it, and whether that person is active.

Looked up with FHIR token searches on both identity forms over the three person types,
six searches per group of users. An account no person names explicitly, but that the
registration gate recorded as a person's (``registered_accounts``), maps to that person,
active as its FHIR resource says: an explicit Matrix id always wins over the record.
Answers are remembered (positive and negative) so that account validity, which runs on
every request, reads memory only; ``refresh`` re-asks FHIR in the background, and while
FHIR is unreachable the last known answer stands.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import attr

from synapse_fhir_module.fhir_client import FhirClient
from synapse_fhir_module.identity import PERSON_TYPES, is_active, matrix_ids_of, person_searches

logger = logging.getLogger(__name__)

# Users asked about in one round of searches (their ids are ORed into each search URL).
USERS_PER_BATCH = 25

# user ids → {user_id: "Practitioner/12"} for the accounts recorded as a person's.
RecordedPersons = Callable[[Sequence[str]], Awaitable[Mapping[str, str]]]


async def no_recorded_persons(user_ids: Sequence[str]) -> Mapping[str, str]:
    return {}


@attr.s(frozen=True, auto_attribs=True)
class PersonRecord:
    """What FHIR said about one Matrix account."""

    user_id: str
    person: str | None  # "Practitioner/12"; None when no single person names the account
    active: bool
    checked_at: float
    ambiguous: bool = False

    @property
    def mapped(self) -> bool:
        return self.person is not None


class PersonDirectory:
    def __init__(
        self,
        fhir: FhirClient,
        *,
        recorded_persons: RecordedPersons = no_recorded_persons,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self._fhir = fhir
        self._recorded_persons = recorded_persons
        self._monotonic = monotonic
        self._records: dict[str, PersonRecord] = {}

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
        users = list(dict.fromkeys(user_ids))
        records = []
        for start in range(0, len(users), USERS_PER_BATCH):
            records.extend(await self._lookup_batch(users[start : start + USERS_PER_BATCH]))
        for record in records:
            self._records[record.user_id] = record
        return records

    async def persons_naming(self, user_id: str) -> dict[str, dict[str, Any]]:
        """The persons whose record names ``user_id`` (``{"Practitioner/12": resource}``),
        asked of FHIR now; no memory, no recorded accounts."""
        return (await self._named_persons([user_id]))[user_id]

    async def _lookup_batch(self, user_ids: Sequence[str]) -> list[PersonRecord]:
        named = await self._named_persons(user_ids)
        recorded = dict(await self._recorded_persons(list(user_ids)))
        unnamed = {user_id: recorded[user_id] for user_id in recorded if not named[user_id]}
        resources = await self._read_persons(set(unnamed.values()))
        now = self._monotonic()
        records = []
        for user_id in user_ids:
            if user_id in unnamed:
                records.append(_recorded_record(user_id, unnamed[user_id], resources, now))
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

    async def _named_persons(self, user_ids: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
        # Plain searches one after another, not a `batch` Bundle of them: HAPI runs batch
        # entries in parallel, and many searches at once can exhaust its database pool.
        found: dict[str, dict[str, dict[str, Any]]] = {user_id: {} for user_id in user_ids}
        for resource_type, params in person_searches(user_ids):
            for person in await self._fhir.search_json(resource_type, params):
                if person.get("resourceType") != resource_type or not person.get("id"):
                    continue
                # The token search matched; check which of our users it really names.
                for user_id in matrix_ids_of(person) & found.keys():
                    found[user_id][f"{resource_type}/{person['id']}"] = person
        return found

    async def _read_persons(self, references: Iterable[str]) -> dict[str, dict[str, Any]]:
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


def _recorded_record(
    user_id: str, person: str, resources: Mapping[str, dict[str, Any]], now: float
) -> PersonRecord:
    """An account recorded as ``person``'s: active while that person is (a person gone
    from FHIR is not active)."""
    resource = resources.get(person)
    return PersonRecord(user_id, person, resource is not None and is_active(resource), now)


def _record(user_id: str, persons: dict[str, dict[str, Any]], now: float) -> PersonRecord:
    active = sorted(ref for ref, person in persons.items() if is_active(person))
    if len(active) == 1:
        return PersonRecord(user_id, active[0], True, now)
    if len(active) > 1:
        # A data error in the directory: nobody may act as either person.
        logger.warning(
            "One Matrix account is named by %d active persons (%s); treating it as unmapped",
            len(active),
            ", ".join(active),
        )
        return PersonRecord(user_id, None, False, now, ambiguous=True)
    if persons:
        return PersonRecord(user_id, sorted(persons)[0], False, now)
    return PersonRecord(user_id, None, False, now)
