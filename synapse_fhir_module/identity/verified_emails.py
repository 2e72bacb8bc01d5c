"""Local accounts' verified email addresses: Synapse's own email 3PIDs, and the module's
copy of them that goes the other way (address → accounts), in ``account_email_store``.

Synapse's record is the truth; the copy only finds candidates, and is corrected each time
an account's addresses are read. Except: the addresses of an account made through single
sign-on are the identity provider's claims, which Synapse stores as verified without
checking the provider verified them — they count only with ``identity.trust_sso_emails``.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import Any

from synapse.module_api import ModuleApi
from synapse.spam_checker_api import RegistrationBehaviour

from synapse_fhir_module.fhir.persons import normalise_email
from synapse_fhir_module.identity import account_email_store


class VerifiedEmails:
    def __init__(self, api: ModuleApi, *, enabled: bool, trust_sso: bool = False) -> None:
        self._api = api
        self.enabled = enabled
        self._trust_sso = trust_sso
        self._table_exists = False

    async def check_registration_for_spam(
        self,
        _email_threepid: dict[str, Any] | None,
        username: str | None,
        _request_info: Collection[tuple[str, str]],
        auth_provider_id: str | None = None,
    ) -> RegistrationBehaviour:
        """Note whether an account is made through single sign-on (before Synapse stores
        the provider's email claim for it). Never refuses; a database error fails the
        registration rather than trust a claim unnoticed."""
        if username is not None and self.enabled:
            await self.create_table()
            await self._api.run_db_interaction(
                "fhir_note_registration",
                account_email_store.note_registration,
                self._api.get_qualified_user_id(username),
                auth_provider_id,
                int(time.time() * 1000),
            )
        return RegistrationBehaviour.ALLOW

    async def of_account(self, user_id: str) -> dict[str, int]:
        """The account's verified addresses as Synapse holds them now (normalised), each
        with when it was verified (ms)."""
        if not self.enabled:
            return {}
        addresses: dict[str, int] = {}
        for threepid in await self._api.get_threepids_for_user(user_id):
            address = threepid.get("address")
            if threepid.get("medium") != "email" or not isinstance(address, str):
                continue
            normalised = normalise_email(address)
            if normalised:
                validated = threepid.get("validated_at")
                addresses[normalised] = int(validated) if isinstance(validated, int) else 0
        await self.create_table()
        if not await self._api.run_db_interaction(
            "fhir_account_emails_copy",
            account_email_store.copy_addresses,
            user_id,
            set(addresses),
            self._trust_sso,
        ):
            return {}
        return addresses

    async def spellings(self, addresses: Collection[str]) -> dict[str, set[str]]:
        """How FHIR records were seen to spell these (normalised) addresses."""
        if not addresses:
            return {}
        await self.create_table()
        return await self._api.run_db_interaction(
            "fhir_email_spellings", account_email_store.spellings_of, list(addresses)
        )

    async def remember_spellings(self, pairs: Collection[tuple[str, str]]) -> None:
        if pairs:
            await self.create_table()
            await self._api.run_db_interaction(
                "fhir_email_spellings_add", account_email_store.add_spellings, list(pairs)
            )

    async def confirm_tie(self, user_id: str, address: str, person: str, validated: int) -> bool:
        """Whether the address may make the account that person's (see
        ``account_email_store.confirm_tie``)."""
        await self.create_table()
        return await self._api.run_db_interaction(
            "fhir_email_tie",
            account_email_store.confirm_tie,
            user_id,
            address,
            person,
            validated,
        )

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
