"""AddressDirectory: lookups answered through the email resolver, only for addresses it
knows, only with usable local accounts; the index rebuilt in the background when old."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

import pytest
import pytest_twisted

from synapse_fhir_module.identity.directory import AddressDirectory, LookupUnavailable
from synapse_fhir_module.identity.lookup import EMAIL, NONE, SHA256, LookupRequest, lookup_hash

PEPPER = "p3pper"


class Resolver:
    """Step 1 stand-in: a fixed address → account table."""

    def __init__(self, accounts: dict[str, str | None]) -> None:
        self.accounts = accounts
        self.asked: list[str] = []
        self.listings = 0
        self.fail_listing = False

    async def account_of_email(self, address: str) -> str | None:
        self.asked.append(address)
        return self.accounts.get(address)

    async def known_addresses(self) -> Iterable[str]:
        self.listings += 1
        if self.fail_listing:
            raise RuntimeError("FHIR away")
        return list(self.accounts)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def pepper() -> str:
    return PEPPER


async def usable(user_id: str) -> bool:
    return user_id.endswith(":example.org") and not user_id.startswith("@gone")


def directory(
    resolver: Resolver, clock: Clock, background: list[Callable[[], Awaitable[None]]]
) -> AddressDirectory:
    return AddressDirectory(
        resolver,
        pepper,
        usable_account=usable,
        run_in_background=background.append,
        max_age=60.0,
        clock=clock,
    )


def hashed(address: str) -> str:
    return lookup_hash(address, EMAIL, PEPPER)


ACCOUNTS: dict[str, str | None] = {
    "anna@example.org": "@anna:example.org",
    "shared@example.org": None,  # several persons carry it
    "remote@example.org": "@remote:elsewhere.org",
    "gone@example.org": "@gone:example.org",  # deactivated
}


@pytest_twisted.ensureDeferred
async def test_hashed_and_plain_lookups_find_the_usable_local_account_only() -> None:
    resolver = Resolver(dict(ACCOUNTS))
    lookups = directory(resolver, Clock(), [])
    entries = [hashed(address) for address in [*ACCOUNTS, "nobody@example.org"]]
    assert await lookups.resolve(LookupRequest(SHA256, PEPPER, tuple(entries))) == {
        hashed("anna@example.org"): "@anna:example.org"
    }
    plain = ("Anna@Example.org email", "nobody@example.org email", "anna@example.org msisdn")
    assert await lookups.resolve(LookupRequest(NONE, PEPPER, plain)) == {
        "Anna@Example.org email": "@anna:example.org"
    }
    # An address no account holds is never asked about.
    assert "nobody@example.org" not in resolver.asked


@pytest_twisted.ensureDeferred
async def test_each_address_is_asked_once_per_request() -> None:
    resolver = Resolver(dict(ACCOUNTS))
    lookups = directory(resolver, Clock(), [])
    entries = ("anna@example.org email", "ANNA@example.org email", "anna@EXAMPLE.org email")
    assert len(await lookups.resolve(LookupRequest(NONE, PEPPER, entries))) == 3
    assert resolver.asked == ["anna@example.org"]


@pytest_twisted.ensureDeferred
async def test_an_old_index_is_used_while_a_new_one_is_built_in_the_background() -> None:
    resolver = Resolver({"anna@example.org": "@anna:example.org"})
    clock = Clock()
    background: list[Callable[[], Awaitable[None]]] = []
    lookups = directory(resolver, clock, background)
    newcomer = LookupRequest(SHA256, PEPPER, (hashed("bram@example.org"),))
    assert await lookups.resolve(newcomer) == {}
    resolver.accounts["bram@example.org"] = "@bram:example.org"
    clock.now = 59.0
    assert await lookups.resolve(newcomer) == {}
    assert background == []  # still fresh
    clock.now = 61.0
    assert await lookups.resolve(newcomer) == {}  # the old index answers ...
    assert len(background) == 1  # ... while one rebuild is started
    assert await lookups.resolve(newcomer) == {}
    assert len(background) == 1  # (not a second one meanwhile)
    await background.pop()()
    assert await lookups.resolve(newcomer) == {hashed("bram@example.org"): "@bram:example.org"}


@pytest_twisted.ensureDeferred
async def test_a_failed_rebuild_keeps_the_old_index() -> None:
    resolver = Resolver({"anna@example.org": "@anna:example.org"})
    clock = Clock()
    background: list[Callable[[], Awaitable[None]]] = []
    lookups = directory(resolver, clock, background)
    anna = LookupRequest(SHA256, PEPPER, (hashed("anna@example.org"),))
    assert await lookups.resolve(anna) == {hashed("anna@example.org"): "@anna:example.org"}
    resolver.fail_listing = True
    clock.now = 100.0
    await lookups.resolve(anna)
    await background.pop()()  # fails quietly
    assert await lookups.resolve(anna) == {hashed("anna@example.org"): "@anna:example.org"}
    assert len(background) == 1  # and is tried again


@pytest_twisted.ensureDeferred
async def test_no_index_at_all_is_an_error_not_an_empty_answer() -> None:
    resolver = Resolver({"anna@example.org": "@anna:example.org"})
    resolver.fail_listing = True
    lookups = directory(resolver, Clock(), [])
    with pytest.raises(LookupUnavailable):
        await lookups.resolve(LookupRequest(SHA256, PEPPER, (hashed("anna@example.org"),)))
