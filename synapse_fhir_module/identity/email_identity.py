"""Identity by email: which local accounts are the persons a care record names only by
their address (OZO data carries no Matrix ids).

The person directory decides, for one account, which person it is (explicit Matrix id,
then the registration record, then a verified address that exactly one person carries).
This part runs that same decision the other way round, for a care team's persons: their
addresses give candidate accounts (the module's copy of Synapse's email 3PIDs), their
registration records give more, and each candidate counts as the person its own lookup
says. Enforcement, recording, account validity and the FHIR → Matrix sync thus share
one resolution.

Synapse tells every instance's module when an account gains or loses an address; the
change is stored, and the instance running the sync re-syncs the teams concerned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

from synapse.module_api import ModuleApi

from synapse_fhir_module.fhir.care_team import AccountsOf, Resources
from synapse_fhir_module.fhir.conventions import PERSON_TYPES
from synapse_fhir_module.fhir.person_directory import PersonDirectory
from synapse_fhir_module.fhir.persons import is_active, matrix_ids_of, normalise_email
from synapse_fhir_module.identity import account_email_store
from synapse_fhir_module.identity.registered_accounts import RegisteredAccounts
from synapse_fhir_module.identity.verified_emails import VerifiedEmails

logger = logging.getLogger(__name__)

# How long an address → account answer (identity lookups) is reused.
LOOKUP_TTL = 60.0

# A dependency key of a team's answer: it used this address, or this account's lookup.
ADDRESS_KEY = "email:"
ACCOUNT_KEY = "account:"

# Called with the references to re-sync ("CareTeam/3", "Practitioner/12").
Resync = Callable[[str], None]


class EmailIdentity:
    def __init__(
        self,
        api: ModuleApi,
        persons: PersonDirectory,
        accounts: RegisteredAccounts,
        emails: VerifiedEmails,
        *,
        lookup_person_types: Collection[str] = ("Practitioner",),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = api
        self._persons = persons
        self._accounts = accounts
        self._emails = emails
        self._enabled = emails.enabled
        self._lookup_types = frozenset(lookup_person_types)
        self._monotonic = monotonic
        # Normalised address → (account or None, when decided), for identity lookups.
        self._lookups: dict[str, tuple[str | None, float]] = {}

    async def resolver_for(self, resources: Resources) -> tuple[AccountsOf, frozenset[str]]:
        """How the persons among ``resources`` map to accounts, and the dependency keys of
        that answer (addresses and accounts consulted). Raises FhirError when FHIR can't
        answer the candidates' lookups: a team must then be unresolved, not shrunk."""
        implicit = {
            reference: person
            for reference, person in resources.items()
            if reference.split("/", 1)[0] in PERSON_TYPES and not matrix_ids_of(person)
        }
        if not implicit:
            return _explicit_or({}), frozenset()
        self._persons.learn_spellings(implicit.values())
        addresses: set[str] = set()
        if self._enabled:
            for person in implicit.values():
                addresses |= self._persons.emails_of(person)
        candidates: set[str] = set()
        for holders in (await self._emails.accounts_with(addresses)).values():
            candidates.update(holders)
        for recorded in (await self._accounts.accounts_of_persons(sorted(implicit))).values():
            candidates.update(recorded)
        owned: dict[str, set[str]] = {}
        if candidates:
            for record in await self._persons.refresh(sorted(candidates)):
                if record.person in implicit:
                    owned.setdefault(record.person, set()).add(record.user_id)
        for reference, accounts in list(owned.items()):
            if len(accounts) > 1:
                # Two accounts are one person by addresses or records (a shared mailbox on
                # the record, say): which of them is the person is a guess. Neither.
                logger.warning(
                    "%s is %d accounts by email or registration; admitting none of them",
                    reference,
                    len(accounts),
                )
                del owned[reference]
        keys = {ADDRESS_KEY + address for address in addresses}
        keys |= {ACCOUNT_KEY + user_id for user_id in candidates}
        return _explicit_or(owned), frozenset(keys)

    async def account_of_email(self, address: str) -> str | None:
        """For identity lookups: the local account that is, by email, the one active
        person carrying ``address`` — of a type lookups may reveal
        (``identity.lookup_person_types``); None when nobody or several carry it, or FHIR
        cannot say now."""
        wanted = normalise_email(address)
        known = self._lookups.get(wanted)
        if known is not None and self._monotonic() - known[1] < LOOKUP_TTL:
            return known[0]
        account = await self._decide(wanted)
        self._lookups[wanted] = (account, self._monotonic())
        return account

    async def _decide(self, address: str) -> str | None:
        if not self._enabled or not address:
            return None
        try:
            carriers = (await self._persons.persons_carrying([address]))[address]
            if len(carriers) != 1:
                return None
            ((reference, person),) = carriers.items()
            if not is_active(person) or reference.split("/", 1)[0] not in self._lookup_types:
                return None
            explicit = sorted(matrix_ids_of(person))
            if explicit:
                # The record names its account: that one, if it names only one.
                return explicit[0] if len(explicit) == 1 else None
            holding = await self._emails.accounts_with([address])
            users = sorted(holding.get(address, set()))
            records = await self._persons.refresh(users) if users else []
        except Exception as e:  # FHIR away: nothing to answer, nothing guessed
            logger.info("Identity lookup could not be decided (%s)", type(e).__name__)
            return None
        mine = [r.user_id for r in records if r.person == reference and r.active]
        return mine[0] if len(mine) == 1 else None

    async def known_addresses(self) -> list[str]:
        """Every address a local account holds (normalised), for hashed lookups."""
        return await self._emails.all_addresses()

    # Synapse's third-party-rules callbacks (every instance).

    async def on_add_user_third_party_identifier(
        self, user_id: str, medium: str, address: str
    ) -> None:
        await self._note(user_id, medium, address, account_email_store.add_address)

    async def on_remove_user_third_party_identifier(
        self, user_id: str, medium: str, address: str
    ) -> None:
        await self._note(user_id, medium, address, account_email_store.remove_address)

    async def _note(self, user_id: str, medium: str, address: str, change: Any) -> None:
        if medium != "email" or not self._enabled:
            return
        normalised = normalise_email(address)
        await self._emails.create_table()
        await self._api.run_db_interaction("fhir_account_email_change", change, user_id, normalised)
        await self._api.run_db_interaction(
            "fhir_identity_change_note",
            account_email_store.note_change,
            user_id,
            normalised,
            int(time.time() * 1000),
        )
        self._lookups.pop(normalised, None)
        logger.info("An account's verified email changed; its care teams will be re-synced")

    async def apply_changes(
        self, resync: Resync, teams_depending_on: Callable[[str], Collection[str]]
    ) -> int:
        """Re-sync what the noted changes touch (run by the instance that syncs): the
        teams whose answers used the account or the address, and the teams of the
        person the account is now and was before. Returns how many were handled."""
        if not self._enabled:
            return 0
        await self._emails.create_table()
        changes = await self._api.run_db_interaction(
            "fhir_identity_changes_take", account_email_store.take_changes
        )
        for user_id, address, changed_ms in changes:
            self._lookups.pop(address, None)
            # The teams whose answers used the account or the address first: they re-sync
            # even if FHIR cannot say who the account is now.
            references = set(teams_depending_on(ACCOUNT_KEY + user_id))
            references |= set(teams_depending_on(ADDRESS_KEY + address))
            before = self._persons.remembered(user_id)
            try:
                (after,) = await self._persons.refresh([user_id])
            except Exception as e:  # (each change on its own: one cannot hold up the rest)
                logger.info(
                    "An address change waits: its account's lookup failed (%s)", type(e).__name__
                )
                for reference in sorted(references):
                    resync(reference)
                continue
            for record in (before, after):
                if record is not None and record.person is not None:
                    references.add(record.person)
            for reference in sorted(references):
                resync(reference)
            await self._api.run_db_interaction(
                "fhir_identity_change_done",
                account_email_store.done,
                user_id,
                address,
                changed_ms,
            )
        return len(changes)


def _explicit_or(owned: Mapping[str, set[str]]) -> AccountsOf:
    """A person's accounts: the ones it names itself, else those found for it."""

    def accounts_of(reference: str, person: Mapping[str, Any]) -> Collection[str]:
        explicit = matrix_ids_of(person)
        return explicit if explicit else owned.get(reference, set())

    return accounts_of
