"""Local accounts' verified email addresses: Synapse's own email 3PIDs, and the module's
copy of them that goes the other way (address → accounts), in ``account_email_store``.

Synapse's record is the truth; the copy only finds candidates, and is corrected each time
an account's addresses are read.
"""

from __future__ import annotations

from collections.abc import Collection

from synapse.module_api import ModuleApi

from synapse_fhir_module import account_email_store
from synapse_fhir_module.identity import normalise_email


class VerifiedEmails:
    def __init__(self, api: ModuleApi, *, enabled: bool) -> None:
        self._api = api
        self.enabled = enabled
        self._table_exists = False

    async def of_account(self, user_id: str) -> set[str]:
        """The account's verified addresses as Synapse holds them now (normalised)."""
        if not self.enabled:
            return set()
        threepids = await self._api.get_threepids_for_user(user_id)
        addresses = {
            normalise_email(threepid["address"])
            for threepid in threepids
            if threepid.get("medium") == "email" and isinstance(threepid.get("address"), str)
        }
        addresses.discard("")
        await self.create_table()
        await self._api.run_db_interaction(
            "fhir_account_emails_replace", account_email_store.replace_addresses, user_id, addresses
        )
        return addresses

    async def accounts_with(self, addresses: Collection[str]) -> dict[str, set[str]]:
        """``{address: accounts}`` (candidates, from the copy) for normalised addresses."""
        if not self.enabled or not addresses:
            return {}
        await self.create_table()
        return await self._api.run_db_interaction(
            "fhir_accounts_with_emails", account_email_store.accounts_with, list(addresses)
        )

    async def all_addresses(self) -> list[str]:
        if not self.enabled:
            return []
        await self.create_table()
        return await self._api.run_db_interaction(
            "fhir_account_emails_all", account_email_store.all_addresses
        )

    async def create_table(self) -> None:
        if self._table_exists:
            return
        try:
            await self._api.run_db_interaction(
                "fhir_account_emails_schema", account_email_store.create_schema
            )
        except Exception:
            # (Another instance creating it at the same moment, on PostgreSQL.)
            await self._api.run_db_interaction(
                "fhir_account_emails_schema", account_email_store.create_schema
            )
        self._table_exists = True
