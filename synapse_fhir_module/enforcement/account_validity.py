"""Account validity from the care record: an account whose FHIR person is inactive is
expired (Synapse answers ``ORG_MATRIX_EXPIRED_ACCOUNT``).

``is_user_expired`` runs on every authenticated request, so it reads memory only; what
it has not seen yet is looked up in the background, and everything known is refreshed
periodically. When FHIR is unreachable the last known answer stands: an outage must
never expire every account.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Collection

from synapse.module_api import ModuleApi

from synapse_fhir_module.fhir.errors import FhirError
from synapse_fhir_module.fhir.person_directory import USERS_PER_BATCH, PersonDirectory

logger = logging.getLogger(__name__)

# After FHIR failed to answer a lookup, wait this long before asking again.
RETRY_AFTER = 10.0


class AccountValidity:
    def __init__(
        self,
        api: ModuleApi,
        persons: PersonDirectory,
        *,
        exempt_users: Collection[str],
        expire_unmapped: bool,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = api
        self._persons = persons
        self._exempt = frozenset(exempt_users)
        self._expire_unmapped = expire_unmapped
        self._monotonic = monotonic
        self._pending: set[str] = set()
        self._draining = False
        self._paused_until = 0.0

    async def is_user_expired(self, user_id: str) -> bool | None:
        """True: expired. None: no opinion (other account-validity rules decide)."""
        if user_id in self._exempt:
            return None
        record = self._persons.remembered(user_id)
        if record is None:
            self.look_up_soon(user_id)
            return None
        if record.mapped:
            return None if record.active else True
        return True if self._expire_unmapped else None

    async def on_user_registration(self, user_id: str) -> None:
        """Link a new account to its FHIR person straight away."""
        self.look_up_soon(user_id)

    def look_up_soon(self, user_id: str) -> None:
        self._pending.add(user_id)
        if not self._draining and self._monotonic() >= self._paused_until:
            self._draining = True
            self._api.run_as_background_process("fhir_person_lookup", self._drain)

    async def refresh_known(self) -> None:
        """Re-ask FHIR about every account seen so far (a periodic background job)."""
        for user_id in self._persons.remembered_users():
            self._pending.add(user_id)
        if not self._draining:
            self._draining = True
            await self._drain()

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch = list(itertools.islice(self._pending, USERS_PER_BATCH))
                try:
                    await self._persons.refresh(batch)
                except FhirError as e:
                    # Keep what we knew; try again later.
                    # (The error text may quote the Matrix ids searched for: not logged.)
                    logger.warning(
                        "Person lookup failed (%s, HTTP %s); keeping last known state",
                        type(e).__name__,
                        e.status,
                    )
                    self._paused_until = self._monotonic() + RETRY_AFTER
                    return
                self._pending.difference_update(batch)
        finally:
            self._draining = False
