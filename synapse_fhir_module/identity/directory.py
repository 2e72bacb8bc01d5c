"""What identity lookups can find: email address → the local account of the one FHIR
person carrying it, through an ``EmailResolver`` (step 1 of issue 12, identity by email).

Hashed lookups cannot be reversed, so the resolver also says which addresses it could
resolve (``known_addresses``); their hashes under the current pepper are kept in memory
(``AddressIndex``), rebuilt in the background once older than ``INDEX_MAX_AGE``. Only an
entry found there is passed to ``account_of_email``: an address nobody carries costs no
question to the resolver (nor to FHIR), whatever a client sends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

from synapse_fhir_module.identity.lookup import AddressIndex, LookupRequest

logger = logging.getLogger(__name__)

# How old the address index may get before a lookup has it rebuilt (in the background:
# that lookup still uses the old one).
INDEX_MAX_AGE = 60.0


class EmailResolver(Protocol):
    async def account_of_email(self, address: str) -> str | None:
        """The local Matrix account that is, by email, the one FHIR person carrying
        ``address`` (compared case-insensitively); None when no account, or the address
        is carried by several persons, or FHIR cannot say now."""
        ...

    async def known_addresses(self) -> Iterable[str]:
        """Every address ``account_of_email`` may answer an account for now (more is
        harmless: those are asked and answer None). Raises when it cannot say now."""
        ...


class LookupUnavailable(Exception):
    """No address index could be built yet (the resolver cannot say which addresses)."""


class AddressDirectory:
    def __init__(
        self,
        resolver: EmailResolver,
        pepper: Callable[[], Awaitable[str]],
        *,
        usable_account: Callable[[str], Awaitable[bool]],
        run_in_background: Callable[[Callable[[], Awaitable[None]]], object],
        max_age: float = INDEX_MAX_AGE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._resolver = resolver
        self._pepper = pepper
        self._usable_account = usable_account
        self._run_in_background = run_in_background
        self._max_age = max_age
        self._clock = clock
        self._index: AddressIndex | None = None
        self._built_at = 0.0
        self._rebuilding = False

    async def resolve(self, request: LookupRequest) -> dict[str, str]:
        """``{entry: user id}`` for the request's entries that name an address of exactly
        one person with a local account; everything else is left out."""
        index = await self._current_index()
        wanted = index.wanted(request)
        accounts: dict[str, str | None] = {}
        for address in set(wanted.values()):
            account = await self._resolver.account_of_email(address)
            # Only an account one can invite: of this server, existing, not deactivated.
            usable = account is not None and await self._usable_account(account)
            accounts[address] = account if usable else None
        mappings: dict[str, str] = {}
        for entry, address in wanted.items():
            account = accounts[address]
            if account is not None:
                mappings[entry] = account
        return mappings

    async def _current_index(self) -> AddressIndex:
        if self._index is None:
            try:
                await self._rebuild()
            except Exception as e:
                raise LookupUnavailable() from e
            assert self._index is not None
        elif self._clock() - self._built_at >= self._max_age and not self._rebuilding:
            self._rebuilding = True
            self._run_in_background(self._rebuild_quietly)
        return self._index

    async def _rebuild(self) -> None:
        pepper = await self._pepper()
        addresses = list(await self._resolver.known_addresses())
        self._index = AddressIndex.build(addresses, pepper)
        self._built_at = self._clock()
        logger.debug("Identity lookups: %d addresses indexed", len(self._index.known))

    async def _rebuild_quietly(self) -> None:
        try:
            await self._rebuild()
        except Exception as e:
            # The old index stays in use. (Addresses are never logged.)
            logger.warning("Could not refresh the identity lookup index: %s", type(e).__name__)
        finally:
            self._rebuilding = False
