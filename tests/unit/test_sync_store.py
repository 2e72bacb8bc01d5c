"""The sync's tables on SQLite (PostgreSQL runs the same statements through Synapse)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest

from synapse_fhir_module.sync import store


@pytest.fixture
def txn() -> Iterator[sqlite3.Cursor]:
    connection = sqlite3.connect(":memory:")
    cursor = connection.cursor()
    store.create_schema(cursor)
    store.create_schema(cursor)  # idempotent: runs at every start
    yield cursor
    connection.close()


def test_one_room_per_fhir_resource(txn: sqlite3.Cursor) -> None:
    assert store.room_of(txn, "CareTeam/1") is None
    store.remember_room(txn, "CareTeam/1", "!a:x")
    store.remember_room(txn, "CareTeam/1", "!b:x")  # replaced, not duplicated
    assert store.room_of(txn, "CareTeam/1") == "!b:x"


def test_a_communication_is_relayed_once(txn: sqlite3.Cursor) -> None:
    assert store.claim_relay(txn, "Communication/9", "!r:x", "@bram:x") is True
    assert store.claim_relay(txn, "Communication/9", "!r:x", "@bram:x") is False
    # Mid-relay (no event id yet) an event by the claimed sender counts as the relay...
    assert store.is_relay_event(txn, "Communication/9", "!r:x", "$e1", "@bram:x") is True
    # ...one by anybody else who copied the content key does not.
    assert store.is_relay_event(txn, "Communication/9", "!r:x", "$e2", "@eve:x") is False
    store.relayed_as(txn, "Communication/9", "$e1")
    assert store.is_relay_event(txn, "Communication/9", "!r:x", "$e1", "@bram:x") is True
    # ...and afterwards no other event, nor the same claim in another room.
    assert store.is_relay_event(txn, "Communication/9", "!r:x", "$forged", "@bram:x") is False
    assert store.is_relay_event(txn, "Communication/9", "!other:x", "$e1", "@bram:x") is False
    assert store.source_of_event(txn, "$e1", "!r:x") == "Communication/9"
    assert store.source_of_event(txn, "$forged", "!r:x") is None
    assert store.source_of_event(txn, "$e1", "!other:x") is None  # (a reply from elsewhere)


def test_a_released_claim_can_be_claimed_again(txn: sqlite3.Cursor) -> None:
    store.claim_relay(txn, "Communication/9", "!r:x", "@bram:x")
    store.release_relay(txn, "Communication/9")
    assert store.claim_relay(txn, "Communication/9", "!r:x", "@bram:x") is True


def test_named_values(txn: sqlite3.Cursor) -> None:
    assert store.get_value(txn, "watermark:CareTeam") is None
    store.set_value(txn, "watermark:CareTeam", "2026-11-25T10:00:00.000Z")
    store.set_value(txn, "watermark:CareTeam", "2026-11-25T11:00:00.000Z")
    assert store.get_value(txn, "watermark:CareTeam") == "2026-11-25T11:00:00.000Z"


def test_a_thread_rooms_mode_is_kept_and_replaced(txn: sqlite3.Cursor) -> None:
    assert store.thread_mode_of(txn, "!r:x") is None
    store.set_thread_mode(txn, "!r:x", "read_only")
    store.set_thread_mode(txn, "!r:x", "open")  # reopened: replaced, not duplicated
    assert store.thread_mode_of(txn, "!r:x") == "open"
    assert store.thread_mode_of(txn, "!other:x") is None
