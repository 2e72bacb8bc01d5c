"""The identity service's tables on SQLite (PostgreSQL runs the same statements through
Synapse): hashed tokens with expiry, and the pepper made once."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator

import pytest

from synapse_fhir_module.identity import store
from synapse_fhir_module.identity.records import TOKEN_PREFIX, new_token, token_hash


@pytest.fixture
def txn() -> Iterator[sqlite3.Cursor]:
    connection = sqlite3.connect(":memory:")
    cursor = connection.cursor()
    store.create_schema(cursor)
    store.create_schema(cursor)  # idempotent: every instance creates it on first use
    yield cursor
    connection.close()


def test_a_token_is_random_and_only_its_hash_is_kept() -> None:
    token = new_token()
    assert token.startswith(TOKEN_PREFIX) and len(token) > 40
    assert token != new_token()
    assert re.fullmatch(r"[0-9a-f]{64}", token_hash(token))
    assert token not in token_hash(token)


def test_a_token_names_its_user_until_it_expires(txn: sqlite3.Cursor) -> None:
    store.store_token(txn, "h1", "@anna:x", 1000, 2000, keep_per_user=5)
    assert store.user_of_token(txn, "h1", 1999) == "@anna:x"
    assert store.user_of_token(txn, "h1", 2000) is None
    assert store.user_of_token(txn, "unknown", 1500) is None


def test_a_revoked_token_is_gone(txn: sqlite3.Cursor) -> None:
    store.store_token(txn, "h1", "@anna:x", 1000, 2000, keep_per_user=5)
    assert store.delete_token(txn, "h1") is True
    assert store.user_of_token(txn, "h1", 1500) is None
    assert store.delete_token(txn, "h1") is False


def test_storing_drops_expired_tokens_and_a_user_s_oldest_beyond_the_limit(
    txn: sqlite3.Cursor,
) -> None:
    store.store_token(txn, "old", "@bram:x", 0, 500, keep_per_user=2)
    for n in range(4):
        store.store_token(txn, f"h{n}", "@anna:x", 1000 + n, 9000, keep_per_user=2)
    assert store.tokens_of_user(txn, "@anna:x") == 2
    assert [store.user_of_token(txn, f"h{n}", 1500) for n in range(4)] == [
        None,
        None,
        "@anna:x",
        "@anna:x",
    ]
    assert store.tokens_of_user(txn, "@bram:x") == 0  # expired, dropped


def test_the_first_pepper_stays(txn: sqlite3.Cursor) -> None:
    assert store.pepper(txn, "first") == "first"
    assert store.pepper(txn, "second") == "first"
