"""The account ↔ person records (``account_store``), reached through ``ModuleApi``.

The table is created on first use, on whichever instance uses it first: the
registration gate writes it, the person directory reads it (also when registration is
no longer gated, for the accounts recorded before).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from synapse.module_api import ModuleApi

from synapse_fhir_module.identity import account_store


def _now_ms() -> int:
    return int(time.time() * 1000)


class RegisteredAccounts:
    def __init__(self, api: ModuleApi, *, clock_ms: Callable[[], int] = _now_ms) -> None:
        self._api = api
        self._clock_ms = clock_ms
        self._table_exists = False

    async def record(self, user_id: str, person: str, established_by: str) -> None:
        await self._create_table()
        await self._api.run_db_interaction(
            "fhir_record_account",
            account_store.record_account,
            user_id,
            person,
            established_by,
            self._clock_ms(),
        )

    async def persons_of(self, user_ids: Sequence[str]) -> dict[str, str]:
        """``{user_id: person}`` for the accounts among ``user_ids`` that have a record."""
        await self._create_table()
        return await self._api.run_db_interaction(
            "fhir_account_persons", account_store.persons_of_accounts, list(user_ids)
        )

    async def accounts_of(self, person: str) -> list[str]:
        """The accounts recorded as ``person``'s."""
        await self._create_table()
        return await self._api.run_db_interaction(
            "fhir_person_accounts", account_store.accounts_of_person, person
        )

    async def accounts_of_persons(self, persons: Sequence[str]) -> dict[str, list[str]]:
        """``{person: accounts}`` for those of ``persons`` with recorded accounts."""
        if not persons:
            return {}
        await self._create_table()
        return await self._api.run_db_interaction(
            "fhir_persons_accounts", account_store.accounts_of_persons, list(persons)
        )

    async def conflicting(self, persons_by_user: Mapping[str, str]) -> set[str]:
        """Of these accounts (user id → the person whose record names it), those recorded
        as somebody else's: an account registered before a record came to name it — it
        is nobody's until the data says one thing."""
        recorded = await self.persons_of(list(persons_by_user)) if persons_by_user else {}
        return {user for user, person in recorded.items() if persons_by_user[user] != person}

    async def _create_table(self) -> None:
        if self._table_exists:
            return
        try:
            await self._api.run_db_interaction("fhir_accounts_schema", account_store.create_schema)
        except Exception:
            # On PostgreSQL a creation running at the same moment (another instance, or
            # another first use here) can fail this one; the second attempt finds the table.
            await self._api.run_db_interaction("fhir_accounts_schema", account_store.create_schema)
        self._table_exists = True
