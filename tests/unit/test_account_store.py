"""The account ↔ person table on SQLite (PostgreSQL runs the same statements through
Synapse)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest

from synapse_fhir_module.identity import account_store as store


@pytest.fixture
def txn() -> Iterator[sqlite3.Cursor]:
    connection = sqlite3.connect(":memory:")
    cursor = connection.cursor()
    store.create_schema(cursor)
    store.create_schema(cursor)  # idempotent: every instance creates it on first use
    yield cursor
    connection.close()


def test_an_account_is_recorded_with_its_person_and_how(txn: sqlite3.Cursor) -> None:
    assert store.recorded_account(txn, "@anna:x") is None
    store.record_account(txn, "@anna:x", "Practitioner/1", "username_and_email", 1000)
    assert store.recorded_account(txn, "@anna:x") == store.RecordedAccount(
        "@anna:x", "Practitioner/1", "username_and_email", 1000
    )


def test_a_later_record_of_the_same_account_replaces_the_earlier(txn: sqlite3.Cursor) -> None:
    store.record_account(txn, "@henk:x", "Patient/1", "email", 1000)
    store.record_account(txn, "@henk:x", "Patient/2", "email", 2000)
    record = store.recorded_account(txn, "@henk:x")
    assert record is not None and (record.person, record.recorded_ms) == ("Patient/2", 2000)


def test_persons_of_several_accounts_at_once(txn: sqlite3.Cursor) -> None:
    store.record_account(txn, "@anna:x", "Practitioner/1", "username_and_email", 1000)
    store.record_account(txn, "@henk:x", "Patient/1", "email", 1000)
    assert store.persons_of_accounts(txn, ["@anna:x", "@henk:x", "@eve:x"]) == {
        "@anna:x": "Practitioner/1",
        "@henk:x": "Patient/1",
    }
    assert store.persons_of_accounts(txn, []) == {}
