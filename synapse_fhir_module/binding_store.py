"""The module's own record of what it bound (``synapse_fhir_bindings``, in Synapse's database).

Room state says which care team a room belongs to, but room state can change behind the
module's back: an admin acting as the service user, state resolution after a fork, a state
reset. The module's record is authoritative (DESIGN §3): a room the module bound belongs to
that team whatever its state says now, and state that disagrees is repaired.

One row per room: a care team's space (``space_id`` NULL; ``thread`` set once messages
sent in the space itself opened one) or a thread's room (``thread`` = its
CommunicationRequest, ``space_id`` = the space that lists it). A thread room stays with
the team it was made for even if its CommunicationRequest is later addressed elsewhere in
FHIR: moving a conversation, history and all, to another team is not a FHIR writer's call.

Functions take a cursor (Synapse's ``LoggingTransaction`` in ``run_db_interaction``); the
SQL runs on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import attr

from synapse_fhir_module.outbox_store import Cursor

TABLE = "synapse_fhir_bindings"

SCHEMA = (
    f"""
    CREATE TABLE IF NOT EXISTS {TABLE} (
        room_id TEXT NOT NULL PRIMARY KEY,
        care_team TEXT NOT NULL,
        thread TEXT,
        space_id TEXT,
        bound_ms BIGINT NOT NULL
    )
    """,
    f"CREATE INDEX IF NOT EXISTS {TABLE}_team ON {TABLE} (care_team)",
)


@attr.s(frozen=True, auto_attribs=True)
class Binding:
    room_id: str
    care_team: str  # "CareTeam/12"
    thread: str | None = None  # "CommunicationRequest/7"
    space_id: str | None = None  # the team's space, for a thread's room; None for the space

    @property
    def is_space(self) -> bool:
        return self.space_id is None


def create_schema(txn: Cursor) -> None:
    for statement in SCHEMA:
        txn.execute(statement)


def bind(txn: Cursor, binding: Binding, now_ms: int) -> None:
    """Record (or correct) what the module bound a room to."""
    txn.execute(
        f"INSERT INTO {TABLE} (room_id, care_team, thread, space_id, bound_ms)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (room_id) DO UPDATE SET"
        " care_team = excluded.care_team, thread = excluded.thread,"
        " space_id = excluded.space_id",
        (binding.room_id, binding.care_team, binding.thread, binding.space_id, now_ms),
    )


def binding_of(txn: Cursor, room_id: str) -> Binding | None:
    txn.execute(
        f"SELECT room_id, care_team, thread, space_id FROM {TABLE} WHERE room_id = ?",
        (room_id,),
    )
    row = txn.fetchone()
    return None if row is None else Binding(*row)


def bindings_of_team(txn: Cursor, care_team: str) -> list[Binding]:
    """The team's space and thread rooms, the space first."""
    txn.execute(
        f"SELECT room_id, care_team, thread, space_id FROM {TABLE} WHERE care_team = ?"
        " ORDER BY space_id IS NOT NULL, room_id",
        (care_team,),
    )
    return [Binding(*row) for row in txn.fetchall()]


def bound_teams(txn: Cursor) -> list[str]:
    """Every CareTeam the module bound a room to."""
    txn.execute(f"SELECT DISTINCT care_team FROM {TABLE} ORDER BY care_team")
    return [str(team) for (team,) in txn.fetchall()]
