"""The module's record of what it bound, several teams per thread room (SQLite; PostgreSQL
runs the same statements through Synapse)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest

from synapse_fhir_module.enforcement import binding_store as store
from synapse_fhir_module.enforcement.binding_store import Binding


@pytest.fixture
def txn() -> Iterator[sqlite3.Cursor]:
    connection = sqlite3.connect(":memory:")
    cursor = connection.cursor()
    store.create_schema(cursor)
    store.create_schema(cursor)  # idempotent: runs at every start
    yield cursor
    connection.close()


SPACE_A = Binding("!a:x", "CareTeam/a")
SPACE_B = Binding("!b:x", "CareTeam/b")
SHARED = Binding(
    "!r:x",
    "CareTeam/a",
    thread="CommunicationRequest/1",
    space_id="!a:x",
    further_teams=("CareTeam/b", "CareTeam/c"),
)


def test_a_room_keeps_its_first_team_and_its_further_teams(txn: sqlite3.Cursor) -> None:
    for binding in (SPACE_A, SPACE_B, SHARED):
        store.bind(txn, binding, 1)
    assert store.binding_of(txn, "!r:x") == SHARED
    assert SHARED.teams == ("CareTeam/a", "CareTeam/b", "CareTeam/c")
    assert store.bindings_of_team(txn, "CareTeam/a") == [SPACE_A, SHARED]
    assert store.bindings_of_team(txn, "CareTeam/b") == [SPACE_B, SHARED]  # the space first
    assert store.bindings_of_team(txn, "CareTeam/c") == [SHARED]
    assert store.bound_teams(txn) == ["CareTeam/a", "CareTeam/b", "CareTeam/c"]


def test_rebinding_replaces_the_further_teams(txn: sqlite3.Cursor) -> None:
    store.bind(txn, SHARED, 1)
    fewer = Binding("!r:x", "CareTeam/a", "CommunicationRequest/1", "!a:x", ("CareTeam/c",))
    store.bind(txn, fewer, 2)
    assert store.binding_of(txn, "!r:x") == fewer
    assert store.bindings_of_team(txn, "CareTeam/b") == []
    # The first team is never also a further one.
    store.bind(txn, Binding("!r:x", "CareTeam/a", None, "!a:x", ("CareTeam/a",)), 3)
    assert store.binding_of(txn, "!r:x") == Binding("!r:x", "CareTeam/a", None, "!a:x")


def test_rows_recorded_before_the_teams_table_read_as_one_team() -> None:
    connection = sqlite3.connect(":memory:")
    cursor = connection.cursor()
    for statement in store.SCHEMA[:2]:  # (the record as it was: no further teams)
        cursor.execute(statement)
    cursor.execute(
        f"INSERT INTO {store.TABLE} (room_id, care_team, thread, space_id, bound_ms)"
        " VALUES ('!r:x', 'CareTeam/a', 'CommunicationRequest/1', '!a:x', 1)"
    )
    store.create_schema(cursor)  # the next start
    assert store.binding_of(cursor, "!r:x") == Binding(
        "!r:x", "CareTeam/a", "CommunicationRequest/1", "!a:x"
    )
    assert store.bound_teams(cursor) == ["CareTeam/a"]
    connection.close()
