"""IdentityRecords through a stand-in for ModuleApi.run_db_interaction on SQLite: tokens
name their user until they expire or are revoked; one pepper for every instance."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

import pytest_twisted

from synapse_fhir_module.identity.records import IdentityRecords, token_hash


class Database:
    """What the records need of ModuleApi: run_db_interaction, on one SQLite database."""

    def __init__(self) -> None:
        self.connection = sqlite3.connect(":memory:")

    async def run_db_interaction(
        self, desc: str, func: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        cursor = self.connection.cursor()
        try:
            return func(cursor, *args, **kwargs)
        finally:
            self.connection.commit()


class Clock:
    def __init__(self) -> None:
        self.ms = 1_000_000

    def __call__(self) -> int:
        return self.ms


def records(database: Database, clock: Clock) -> IdentityRecords:
    return IdentityRecords(database, token_lifetime=60.0, clock_ms=clock)  # type: ignore[arg-type]


@pytest_twisted.ensureDeferred
async def test_a_token_names_its_user_until_it_expires_or_is_revoked() -> None:
    database, clock = Database(), Clock()
    tokens = records(database, clock)
    first = await tokens.issue("@anna:example.org")
    second = await tokens.issue("@anna:example.org")
    assert first != second
    assert await tokens.user_of(first) == "@anna:example.org"
    assert await tokens.user_of("sfm_is_guess") is None
    assert await tokens.revoke(first) is True
    assert await tokens.user_of(first) is None
    clock.ms += 60_000
    assert await tokens.user_of(second) is None  # expired


@pytest_twisted.ensureDeferred
async def test_only_the_hash_of_a_token_is_stored() -> None:
    database = Database()
    token = await records(database, Clock()).issue("@anna:example.org")
    rows = database.connection.execute("SELECT * FROM synapse_fhir_identity_tokens").fetchall()
    assert token not in repr(rows)
    assert token_hash(token) in repr(rows)


@pytest_twisted.ensureDeferred
async def test_every_instance_and_restart_gets_the_same_pepper() -> None:
    database = Database()
    first = await records(database, Clock()).pepper()
    again = await records(database, Clock()).pepper()  # another instance, or after a restart
    assert first == again and len(first) == 32
