"""The module's email tables on SQLite (PostgreSQL runs the same statements through
Synapse): the copy of accounts' addresses, changes to re-sync, spellings, and ties."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest

from synapse_fhir_module.identity import account_email_store as store


@pytest.fixture
def txn() -> Iterator[sqlite3.Cursor]:
    connection = sqlite3.connect(":memory:")
    cursor = connection.cursor()
    store.create_schema(cursor)
    store.create_schema(cursor)  # idempotent: every instance creates it on first use
    yield cursor
    connection.close()


def test_the_copy_goes_from_an_address_to_its_accounts(txn: sqlite3.Cursor) -> None:
    assert store.replace_addresses(txn, "@a:x", {"a@x.example", "shared@x.example"})
    assert not store.replace_addresses(txn, "@a:x", {"a@x.example", "shared@x.example"})
    store.add_address(txn, "@b:x", "shared@x.example")
    store.add_address(txn, "@b:x", "shared@x.example")  # (twice: no error, one row)
    assert store.accounts_with(txn, ["shared@x.example", "none@x.example"]) == {
        "shared@x.example": {"@a:x", "@b:x"}
    }
    store.remove_address(txn, "@a:x", "shared@x.example")
    assert store.accounts_with(txn, ["shared@x.example"]) == {"shared@x.example": {"@b:x"}}
    assert store.all_addresses(txn) == ["a@x.example", "shared@x.example"]


def test_a_change_is_done_only_if_nothing_changed_since_it_was_taken(
    txn: sqlite3.Cursor,
) -> None:
    store.note_change(txn, "@a:x", "a@x.example", 1000)
    ((user, address, changed),) = store.take_changes(txn)
    store.note_change(txn, "@a:x", "a@x.example", 2000)  # changed again meanwhile
    store.done(txn, user, address, changed)
    assert store.take_changes(txn) == [("@a:x", "a@x.example", 2000)]
    store.done(txn, "@a:x", "a@x.example", 2000)
    assert store.take_changes(txn) == []


def test_spellings_are_kept_per_address(txn: sqlite3.Cursor) -> None:
    store.add_spellings(txn, [("jan@x.nl", "Jan@X.nl"), ("jan@x.nl", "JAN@x.nl")])
    store.add_spellings(txn, [("jan@x.nl", "Jan@X.nl")])
    assert store.spellings_of(txn, ["jan@x.nl", "other@x.nl"]) == {
        "jan@x.nl": {"Jan@X.nl", "JAN@x.nl"}
    }


def test_an_address_that_leads_elsewhere_carries_nothing_over_until_verified_again(
    txn: sqlite3.Cursor,
) -> None:
    # The leaver's account verified the practice address at 1000; it made them the GP.
    assert store.confirm_tie(txn, "@leaver:x", "gp@praktijk.nl", "Practitioner/old", 1000)
    assert store.confirm_tie(txn, "@leaver:x", "gp@praktijk.nl", "Practitioner/old", 1000)
    # The record now gives the address to the successor: the old verification is no proof.
    assert not store.confirm_tie(txn, "@leaver:x", "gp@praktijk.nl", "Practitioner/new", 1000)
    # Verified again later (whoever holds the mailbox now): the tie moves.
    assert store.confirm_tie(txn, "@leaver:x", "gp@praktijk.nl", "Practitioner/new", 5000)
    assert not store.confirm_tie(txn, "@leaver:x", "gp@praktijk.nl", "Practitioner/old", 5000)
